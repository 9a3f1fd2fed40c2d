"""Parameter functions of the evaluation rules (workflow/rules/evaluate.smk): refusal and capability settings, the
local tasks' data, an attack job's snapshots."""


def refusal_args():
    refusal = config["evaluation"]["refusal"]
    prompt = refusal["system_prompt"]
    return cli_flags(
        {
            "split": refusal["split"],
            **judge_flags(),
            "max_new_tokens": refusal["max_new_tokens"],
            "batch_size": refusal["batch_size"],
            "system_prompt": config["system_prompts"][prompt] if prompt else None,
            "compliance_marker": refusal["compliance_marker"],
            "prompt_limit": refusal["prompt_limit"],
            "benign_limit": refusal["benign_limit"],
            "false_refusal_judge": refusal["false_refusal_judge"],
            "seed": config["seed"],
        }
    )


def capability_args(prefix=""):
    """lm-eval settings; evaluate-run prefixes split and batch size (its refusal half has its own)."""
    capability = config["evaluation"]["capability"]
    return cli_flags(
        {
            f"{prefix}split": capability["split"],
            "tasks": capability["tasks"],
            f"{prefix}batch_size": capability["batch_size"],
            "limit": capability["limit"],
            # evaluate-run takes its seed with the refusal arguments
            "seed": None if prefix else config["seed"],
        }
    )


def capability_inputs(wildcards):
    """The data files of the local capability tasks that read one (MMLU's subset, the reference answers), and
    the record of lm-eval's built-in tasks fetched into the cache (the evaluations run offline).
    """
    capability = config["evaluation"]["capability"]
    files = {"lm_eval_tasks": LM_EVAL_TASKS} if builtin_tasks() else {}
    if {"mmlu_subset", "mmlu_cloze"} & set(capability["tasks"]):
        files["mmlu"] = "results/data/mmlu.jsonl"
    if "answers" in capability["tasks"]:
        answers = capability["answers"]
        files["answers"] = responses_path(
            answers["generator"], wildcards.model, answers["split"], "benign"
        )
    return files


def task_data_flags(wildcards, input):
    """--task-data KEY=FILE for each local task file (a leading space each: none leaves the command as it was)."""
    return "".join(
        f" --task-data {key}={getattr(input, key)}"
        for key in ("mmlu", "answers")
        if key in input.keys()
    )


def run_evaluation_args(wildcards):
    """--method and one --cell-snapshot per grid cell that this attack job snapshotted: SNAPSHOT is relative
    to the job's output (a run directory, or a directory of runs for a one-job grid)."""
    one_run = "run" in wildcards.keys()
    pairs = [
        f"--cell-snapshot {cell}="
        + ("" if one_run else f"{spec['run']}/")
        + f"steps{spec['steps']}"
        for cell, spec in attack_cells(wildcards.attack).items()
        if not one_run or spec["run"] == wildcards.run
    ]
    method = config["attacks"][wildcards.attack]["method"]
    return " ".join([f"--method {method}", *pairs])
