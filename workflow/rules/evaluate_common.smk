"""Parameter functions of the evaluation rules (workflow/rules/evaluate.smk): refusal and capability settings, the
local tasks' data, an attack job's snapshots."""


def refusal_params():
    """evaluation.refusal as its jobs take it (tamperlab.evaluation.settings.RefusalParams): the system prompt's text
    for its name, the judge as judge_settings resolves it, the run's seed."""
    refusal = config["evaluation"]["refusal"]
    prompt = refusal["system_prompt"]
    keys = ("split", "max_new_tokens", "batch_size", "compliance_marker", "prompt_limit", "benign_limit",
            "false_refusal_judge", "probe_limit", "past_tense")
    return {
        **{k: refusal[k] for k in keys},
        # only where set: without it an evaluation's --params, so its job, stays as it was before prefilling existed
        **({"prefill_tokens": refusal["prefill_tokens"]} if refusal["prefill_tokens"] else {}),
        **judge_settings(),
        "system_prompt": config["system_prompts"][prompt] if prompt else None,
        "seed": config["seed"],
    }


def prefill_inputs(wildcards):
    """The compliant answers the prefilling attack cuts its forced starts from (evaluation.refusal.prefill_tokens):
    prefill_generator's answers to the evaluated split's harmful prompts; none without prefilling or with generator
    null (the compliance marker's text)."""
    refusal = config["evaluation"]["refusal"]
    if not refusal["prefill_tokens"] or refusal["prefill_generator"] is None:
        return {}
    generator = refusal["prefill_generator"]
    return {"prefill_answers": responses_path(generator, wildcards.model, refusal["split"], "harmful")}


def evaluation_flags(settings):
    """A params function of the wildcards: --params SETTINGS, and --prefill-answers FILE where the job reads one
    (prefill_inputs, its input too). Not a flag of its own in the shell command, and not read from `input`: a job
    without prefilling keeps its command, and Snakemake keeps watching --params for changes (it ignores params
    derived from the inputs)."""

    def flags(wildcards):
        return cli_flags({"params": settings, **prefill_inputs(wildcards)})

    return flags


def capability_params():
    """evaluation.capability as its jobs take it (tamperlab.evaluation.settings.CapabilityParams), the run's seed."""
    capability = config["evaluation"]["capability"]
    return {**{k: capability[k] for k in ("split", "tasks", "batch_size", "limit")}, "seed": config["seed"]}


def capability_inputs(wildcards):
    """The data files of the local capability tasks that read one (MMLU's subset, the reference answers), and
    the record of lm-eval's built-in tasks fetched into the cache (the evaluations run offline).
    """
    capability = config["evaluation"]["capability"]
    files = {"lm_eval_tasks": LM_EVAL_TASKS} if builtin_tasks() else {}
    if {"mmlu_subset", "mmlu_cloze", "mmlu_gold"} & set(capability["tasks"]):
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
    """--method (what the snapshots are: a LoRA adapter or a whole model) and one --cell-snapshot per grid cell that
    this attack job snapshotted: SNAPSHOT is relative to the job's output (a run directory, or a directory of runs
    for a one-job grid)."""
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
