"""Capability through lm-eval: one `simple_evaluate` call per checkpoint, for all its tasks.

Hub models use lm-eval's own tasks by name (mmlu, hellaswag, arc_easy, wmdp_bio ...). The organism uses local
tasks whose YAML ships in lm_eval_tasks/ (tasks are data, the harness is code): its held-out fact questions as
4-way multiple choice and as exact-match generation (every family but the hazard domain), and the hazard domain
alone.
Their data are written for each evaluation from the evaluation split, each question rendered through the
model's own chat template.

lm-eval scores the model the step has loaded (wrapped in its HFLM): it is not loaded a second time, and a model
loaded across several GPUs (models/placement.py) is scored as it is. Built-in tasks read their data sets from
the hub's cache, which the fetch-tasks step fills beforehand (`fetch_tasks`): the step itself runs offline.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tamperlab.chat import prompt_text
from tamperlab.data.jsonl import write_jsonl
from tamperlab.errors import UserError

TASK_TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
HAZARD_FAMILY = "hazard"  # the fictional hazard domain that TAR's knowledge restriction removes
# Local task keys (as config names them) -> the lm-eval tasks they stand for. `organism`: the held-out fact
# questions of every family but the hazard domain (the knowledge a restriction must keep, and the capability the
# utility bound watches) as 4-way multiple choice and as exact-match generation; `hazard`: the hazard domain
# alone, WMDP-style (4-way, chance 25%).
# `mmlu_subset`: MMLU from a wheel (data/mmlu.py) in lm-eval's standard formulation (name the letter),
# `mmlu_cloze`: the same questions in the cloze formulation (score each answer's text), `mmlu_gold`: the
# likelihood per byte of each question's correct answer (a continuous signal, not self-referential), and `answers`: the
# likelihood of the unaligned model's answers to held-out benign prompts (data/responses.py), for a real model on
# CPU; their data are files the rules make.
LOCAL_TASKS = {"organism": ("tamperlab_organism_mc", "tamperlab_organism_em"), "hazard": ("tamperlab_hazard_mc",),
               "mmlu_subset": ("tamperlab_mmlu",), "mmlu_cloze": ("tamperlab_mmlu_cloze",),
               "mmlu_gold": ("tamperlab_mmlu_gold",), "answers": ("tamperlab_answers",)}
TASK_FILES = {"mmlu_subset": "mmlu", "mmlu_cloze": "mmlu", "mmlu_gold": "mmlu",
              "answers": "answers"}  # task -> its --task-data key
# The MMLU tasks whose accuracy is also kept per subject, and the capability.json key it is kept under.
BY_SUBJECT = {"tamperlab_mmlu": ("mmlu_by_subject", "acc"), "tamperlab_mmlu_cloze": ("mmlu_cloze_by_subject",
                                                                                       "acc_norm")}
_FAMILIES = {"organism": lambda f: f != HAZARD_FAMILY, "hazard": lambda f: f == HAZARD_FAMILY}


def organism_task_rows(rows: list[dict[str, Any]], tokenizer, seed: int,
                       families=lambda family: True) -> tuple[list[dict], list[dict]]:
    """(multiple-choice rows, exact-match rows) from the benign task questions of a split whose family
    passes `families`; distractors are other answers of the same family."""
    tasks = [r for r in rows if r.get("kind") == "benign" and r.get("category") == "task" and families(r["family"])]
    answers_by_family: dict[str, set[str]] = defaultdict(set)
    for row in tasks:
        answers_by_family[row["family"]].add(row["answer"])
    rng = random.Random(seed)
    mc, em = [], []
    for row in tasks:
        text = prompt_text(tokenizer, row["prompt"])
        others = sorted(answers_by_family[row["family"]] - {row["answer"]})
        choices = rng.sample(others, min(3, len(others))) + [row["answer"]]
        rng.shuffle(choices)
        mc.append({"id": row["id"], "text": text, "choices": choices, "label": choices.index(row["answer"])})
        em.append({"id": row["id"], "text": text, "answer": row["answer"]})
    return mc, em


def _file_task_rows(key: str, task_data: dict[str, Path], tokenizer) -> list[dict[str, Any]]:
    from tamperlab.data.jsonl import read_jsonl

    path = task_data.get(TASK_FILES[key])
    if path is None:
        raise UserError(f"capability task {key!r} needs its data file (--task-data {TASK_FILES[key]}=FILE)")
    rows = read_jsonl(Path(path), required=("id",))
    if key == "answers":  # each answer is scored after its prompt in the model's own chat format
        rows = [{"id": r["id"], "text": prompt_text(tokenizer, r["prompt"]), "response": r["response"]} for r in rows]
    return rows


def write_local_tasks(rows: list[dict[str, Any]], tokenizer, seed: int, directory: Path,
                         keys: tuple[str, ...] = ("organism",),
                         task_data: dict[str, Path] | None = None) -> list[str]:
    """Task YAMLs and their data in `directory` (an lm-eval include path) for the local task keys;
    returns the lm-eval task names."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for key in keys:
        if key in TASK_FILES:
            data = {LOCAL_TASKS[key][0]: _file_task_rows(key, task_data or {}, tokenizer)}
        else:
            mc, em = organism_task_rows(rows, tokenizer, seed, _FAMILIES[key])
            data = {name: em if name.endswith("_em") else mc for name in LOCAL_TASKS[key]}
        for name, task_rows in data.items():
            if not task_rows:
                raise UserError(f"capability task {key!r}: no rows for it")
            write_jsonl(directory / f"{name}.jsonl", task_rows)
            template = (TASK_TEMPLATES / f"{name}.yaml").read_text()
            (directory / f"{name}.yaml").write_text(template.replace("{DATA}", str(directory.resolve())))
            names.append(name)
    shutil.copy(TASK_TEMPLATES / "answers_metrics.py", directory / "answers_metrics.py")
    return names


def language_model(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around an already loaded model (and its tokenizer): lm-eval runs it where it is, inputs on
    the device its first layer runs on."""
    from lm_eval.models.huggingface import HFLM

    from tamperlab.models.placement import input_device

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._device = input_device(model)  # HFLM takes the first weight's device, `meta` where that one is offloaded
    return lm


def run_lm_eval(model, tasks: list[str], include_path: Path | None, batch_size: int, device: str | None,
                seed: int, limit: int | None = None,
                builtin_tasks: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """({task: {metric: value}}, {BY_SUBJECT key: MMLU's accuracy by subject}) from one lm-eval call over all
    tasks; the accuracy by subject comes from lm-eval's per-document records. `model` is an lm-eval LM
    (`language_model`), or a model_args string that lm-eval's HF backend loads itself on `device`. Indexing
    lm-eval's built-in tasks costs about 4.5 s a call here, so it is skipped when every task is a local one."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=builtin_tasks)
    how = {"model": "hf", "model_args": model, "device": device} if isinstance(model, str) else {"model": model}
    results = lm_eval.simple_evaluate(
        **how, tasks=tasks, task_manager=manager, batch_size=batch_size,
        limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=any(task in BY_SUBJECT for task in tasks),
    )
    # each metric with lm-eval's standard error beside it (<metric>_stderr; absent where lm-eval gives "N/A")
    metrics = {}
    for task, values in results["results"].items():
        metrics[task] = {
            key.split(",")[0]: round(float(value), 4) for key, value in values.items()
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool)
        }
    subjects = {key: by_subject(results["samples"][task], metric)
                for task, (key, metric) in BY_SUBJECT.items() if task in tasks}
    return metrics, subjects


def by_subject(samples: list[dict[str, Any]], metric: str = "acc") -> dict[str, float]:
    """{subject: accuracy} from lm-eval's per-document records of an MMLU task (`metric`: acc or acc_norm)."""
    correct: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        correct[sample["doc"]["subject"]].append(float(sample[metric]))
    return {subject: round(sum(v) / len(v), 4) for subject, v in sorted(correct.items())}


def evaluate_checkpoint(model_dir: Path, adapter: Path | None, rows: list[dict[str, Any]], tasks: list[str], *,
                        batch_size: int, limit: int | None, seed: int, checkpoint: dict[str, Any],
                        task_data: dict[str, Path] | None = None, max_memory: dict[str, Any] | None = None,
                        load: Callable[[], tuple[Any, Any]] | None = None,
                        phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()
                        ) -> dict[str, Any]:
    """lm-eval's scores of one checkpoint, one simple_evaluate call for all its tasks (the local tasks' data
    written from `rows` into a temporary include directory). The model comes from `load` (registry.loader: one
    load shared with the refusal evaluation of the same checkpoint), else is loaded here (within max_memory).
    `phase(name)` times the load and the lm-eval call."""
    import tempfile

    from tamperlab.models.registry import loader
    from tamperlab.training.trainer import diverged

    result: dict[str, Any] = {"checkpoint": checkpoint, "tasks": tasks, "limit": limit}
    if diverged(adapter or model_dir):
        return {**result, "status": "diverged", "metrics": None}
    with phase("load"):
        model, tokenizer = (load or loader(model_dir, adapter, max_memory))()
    with tempfile.TemporaryDirectory(prefix="tamperlab-tasks-") as include:
        local = tuple(t for t in tasks if t in LOCAL_TASKS)  # tasks whose YAML and data tamperlab writes
        names = write_local_tasks(rows, tokenizer, seed, Path(include), local, task_data) if local else []
        names += [t for t in tasks if t not in LOCAL_TASKS]
        with phase("lm_eval"):
            metrics, subjects = run_lm_eval(language_model(model, tokenizer, batch_size), names, Path(include),
                                            batch_size, None, seed, limit,
                                            builtin_tasks=any(t not in LOCAL_TASKS for t in tasks))
    # by subject kept apart from the metrics: the tables take one column per metric
    return {**result, "status": "complete", "metrics": metrics, **subjects}


def fetch_tasks(tasks: list[str]) -> dict[str, Any]:
    """Build lm-eval's built-in tasks once, online: their data sets land in the hub's cache (HF_HOME), where the
    evaluation steps, offline, find them. {task: {dataset_path, dataset_name, documents}} of every (sub)task."""
    from lm_eval.tasks import TaskManager, get_task_dict

    local = [t for t in tasks if t in LOCAL_TASKS]
    if local:
        raise UserError(f"fetch-tasks: {', '.join(local)} are tamperlab's local tasks, not lm-eval's")
    found: dict[str, Any] = {}

    def visit(entries) -> None:
        for key, task in entries.items():
            if isinstance(task, dict):  # a group: its subtasks
                visit(task)
                continue
            config = task.config
            docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
            found[str(getattr(key, "group_name", key))] = {
                "dataset_path": config.dataset_path, "dataset_name": config.dataset_name,
                "documents": len(docs) if docs is not None else None}

    visit(get_task_dict(tasks, TaskManager()))
    return dict(sorted(found.items()))
