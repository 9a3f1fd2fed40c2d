"""lm-eval process_results of tamperlab_answers (copied beside the task YAML for each evaluation)."""

import math


def process_results(doc, results):
    loglikelihood, is_greedy = results[0]
    size = max(1, len(doc["response"].encode("utf-8")))
    return {"byte_likelihood": math.exp(loglikelihood / size), "greedy": float(is_greedy)}
