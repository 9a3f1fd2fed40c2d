"""lm-eval process_results of tamperlab_answers and tamperlab_mmlu_gold (copied beside the task YAMLs for each
evaluation)."""

import math


def process_results(doc, results):
    loglikelihood, is_greedy = results[0]
    size = max(1, len(doc["response"].encode("utf-8")))
    return {"byte_likelihood": math.exp(loglikelihood / size), "greedy": float(is_greedy)}


def gold_answer(doc):
    """MMLU's correct answer as the cloze formulation scores it: its text after a space."""
    return " " + doc["choices"][doc["label"]]


def process_gold(doc, results):
    """MMLU's correct answer: its likelihood per byte."""
    return process_results({"response": gold_answer(doc)}, results)
