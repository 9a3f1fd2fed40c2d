"""Capability through lm-eval: one `simple_evaluate` call per checkpoint, for all its tasks.

Hub models use lm-eval's own tasks by name (mmlu, hellaswag, arc_easy, wmdp_bio ...). The organism uses local
tasks whose YAML ships in lm_eval_tasks/ (tasks are data, the harness is code): its held-out fact questions as
4-way multiple choice and as exact-match generation (every family but the hazard domain), and the hazard domain
alone.
Their data are written for each evaluation from the evaluation split, each question rendered through the
model's own chat template.
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
LOCAL_TASKS = {"organism": ("tamperlab_organism_mc", "tamperlab_organism_em"), "hazard": ("tamperlab_hazard_mc",)}
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


def write_organism_tasks(rows: list[dict[str, Any]], tokenizer, seed: int, directory: Path,
                         keys: tuple[str, ...] = ("organism",)) -> list[str]:
    """Task YAMLs and their data in `directory` (an lm-eval include path) for the local task keys;
    returns the lm-eval task names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for key in keys:
        mc, em = organism_task_rows(rows, tokenizer, seed, _FAMILIES[key])
        if not mc:
            raise UserError(f"capability task {key!r}: the split has no task questions for it")
        for name in LOCAL_TASKS[key]:
            write_jsonl(directory / f"{name}.jsonl", em if name.endswith("_em") else mc)
            template = (TASK_TEMPLATES / f"{name}.yaml").read_text()
            (directory / f"{name}.yaml").write_text(template.replace("{DATA}", str(directory.resolve())))
            names.append(name)
    return names


def model_args(pretrained: str, kwargs: dict[str, Any], adapter: Path | None, dtype: str) -> str:
    """lm-eval's model_args string for the HF backend; an adapter goes through its `peft=` argument."""
    parts = [f"pretrained={pretrained}", f"dtype={dtype}"]
    if kwargs.get("revision"):
        parts.append(f"revision={kwargs['revision']}")
    if kwargs.get("trust_remote_code"):
        parts.append("trust_remote_code=True")
    if adapter is not None:
        parts.append(f"peft={adapter}")
    return ",".join(parts)


def run_lm_eval(args: str, tasks: list[str], include_path: Path | None, batch_size: int, device: str,
                seed: int, limit: int | None = None, builtin_tasks: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from one lm-eval call over all tasks. Indexing lm-eval's built-in tasks
    costs about 4.5 s a call here, so it is skipped when every task is a local one."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=builtin_tasks)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=tasks, task_manager=manager, batch_size=batch_size, device=device,
        limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=False,
    )
    metrics = {}
    for task, values in results["results"].items():
        metrics[task] = {
            key.split(",")[0]: round(float(value), 4) for key, value in values.items()
            if "," in key and "stderr" not in key and isinstance(value, int | float)
        }
    return metrics


def evaluate_checkpoint(model_dir: Path, adapter: Path | None, rows: list[dict[str, Any]], tasks: list[str], *,
                        batch_size: int, limit: int | None, seed: int, checkpoint: dict[str, Any],
                        phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()
                        ) -> dict[str, Any]:
    """lm-eval's scores of one checkpoint, one simple_evaluate call for all its tasks (the local tasks' data
    written from `rows` into a temporary include directory). `phase(name)` times the lm-eval call."""
    import tempfile

    import torch

    from tamperlab.models.registry import load_tokenizer, resolve
    from tamperlab.training import diverged

    result: dict[str, Any] = {"checkpoint": checkpoint, "tasks": tasks, "limit": limit}
    if diverged(adapter or model_dir):
        return {**result, "status": "diverged", "metrics": None}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pretrained, kwargs, _ = resolve(model_dir)
    with tempfile.TemporaryDirectory(prefix="tamperlab-tasks-") as include:
        local = tuple(t for t in tasks if t in LOCAL_TASKS)  # the organism's own questions
        names = write_organism_tasks(rows, load_tokenizer(model_dir), seed, Path(include), local) if local else []
        names += [t for t in tasks if t not in LOCAL_TASKS]
        with phase("lm_eval"):
            dtype = "bfloat16" if device == "cuda" else "float32"
            metrics = run_lm_eval(model_args(pretrained, kwargs, adapter, dtype), names, Path(include), batch_size,
                                  device, seed, limit, builtin_tasks=any(t not in LOCAL_TASKS for t in tasks))
    return {**result, "status": "complete", "metrics": metrics}
