"""The input, parameter and resource functions every stage's rules share: names, paths, launchers, resources, the
refusal judge, an attack grid's runs and cells. Each stage's own are in <stage>_common.smk beside its rule file; the
config is validated by the Snakefile. A method's hyperparameters reach its job one way: its resolved config block as
one `--params '<json>'` (cli_flags), which one dataclass validates (tamperlab.runtime.params)."""

import functools
import json
import re
import shlex

from tamperlab.attacks import grid
from tamperlab.attacks.grid import attack_grid as grid_of
from tamperlab.models.alignment import UNALIGNED
from tamperlab.runtime import launch


# Every rule's command pins the CPU numerics before torch loads (tamperlab.runtime.numerics): on the command line, so
# that `snakemake -n -p` shows them and a copied line computes the same bits, and a param, so that changing them reruns.
# The config's plugins travel the same way: every job imports them (their methods registered) before it parses.
NUMERICS = " ".join([f"--numerics {config['cpu']['numerics']}",
                     *(f"--plugin {shlex.quote(m)}" for m in config["plugins"])])


def names_regex(names):
    """A wildcard constraint matching exactly these names (nothing, when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


def cli_flags(mapping):
    """--key value for each entry: lists repeat the flag, dicts become JSON, True is a bare flag."""
    parts = []
    for key, value in mapping.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.extend(f"{flag} {shlex.quote(str(v))}" for v in value)
        elif isinstance(value, dict):
            parts.append(f"{flag} {shlex.quote(json.dumps(value, sort_keys=True))}")
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def models_of(*sources, aligned=None):
    """Models of these sources; aligned=True/False: only those with/without an `align:` stage."""
    return [
        name
        for name, spec in config["models"].items()
        if spec["source"] in sources
        and (aligned is None or bool(spec.get("align")) == aligned)
    ]


def aligned_models():
    return [name for name, spec in config["models"].items() if spec.get("align")]


def pretrained_dir(model):
    """A model as built, registered or imported: before safety tuning when it has an `align:` stage."""
    stage = UNALIGNED if config["models"][model].get("align") else "base"
    return f"results/models/{model}/{stage}"


def evaluated_defences():
    """The {defence} values an evaluation may take: every defence, and `unaligned` where a model is aligned here."""
    return list(config["defences"]) + ([UNALIGNED] if aligned_models() else [])


def responses_path(generator, model, split, kind):
    """The answers file a stage reads: generator `self` is the model itself."""
    name = model if generator == "self" else generator
    return f"results/responses/{name}/{split}-{kind}.jsonl"


def model_resource(key, wildcards):
    """A job's `key` resource from its model's size class (config resources:; gpu: the model's gpus if set)."""
    spec = config["models"][wildcards.model]
    if key == "gpu" and spec["gpus"] and config["resources"][spec["size"]]["gpu"]:
        return spec["gpus"]
    return config["resources"][spec["size"]].get(key, 0)


# Every job that loads a model asks for what its size class needs (SLURM executor plugin names).
MODEL_RESOURCES = {
    key: functools.partial(model_resource, key)
    for key in ("gpu", "cpus_per_task", "mem_mb", "runtime")
}


def model_threads(wildcards):
    """Threads of a job on a model = its size class's cpus_per_task (Snakemake caps them at --cores and exports
    them as OMP_NUM_THREADS, which torch follows). Where a job is mostly Python start-up (a tiny organism), one CPU
    per job lets two jobs run at once on a laptop (tests/configs/smoke.yaml)."""
    return model_resource("cpus_per_task", wildcards)


def _launch_spec(wildcards):
    spec = config["models"][wildcards.model]
    path = spec["deepspeed_config"] or str(launch.ZERO3_CONFIG)
    return spec["size"], spec["zero3"], spec["gpus"], path


def launcher(wildcards):
    """The command that starts a training step (in place of plain `tamperlab`), or `accelerate launch` under ZeRO-3."""
    return f"{launch.launcher(*_launch_spec(wildcards))} {NUMERICS}"


def zero3_flags(wildcards):
    size, zero3, _, path = _launch_spec(wildcards)
    return launch.zero3_arguments(size, zero3, path)


def max_memory_flags(wildcards):
    """--max-memory for a job that loads its model for inference (evaluations, responses): across the job's GPUs
    when it holds several (launch.inference_max_memory), else nothing, the model on one device (a leading space
    each: none leaves the command as it was)."""
    gpus = model_resource("gpu", wildcards)
    flags = cli_flags({"max_memory": launch.inference_max_memory(gpus)})
    return f" {flags}" if flags else ""


def checkpoint_dir(wildcards):
    """The model a (model, defence) pair names: `none` is the model as built or registered (and aligned, where it
    has an `align:` stage); `unaligned` is such a model before its safety tuning."""
    if wildcards.defence == "none":
        return f"results/models/{wildcards.model}/base"
    return f"results/models/{wildcards.model}/{wildcards.defence}"


# The refusal judge's model, where it is a hub id: registered once like a model (rule register_judge, a local
# rule: its snapshot in the hub cache), and loaded from there by every evaluation and scan, offline.
JUDGE_DIR = "results/judges/refusal"


# a hub id as the schema takes it (owner/name, pinned); anything else is a local directory
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def hub_judge():
    """The refusal judge's classifier spec when its model is a hub id (not a local directory), else None."""
    refusal = config["evaluation"]["refusal"]
    classifier = refusal["classifier"]
    if refusal["judge"] == "keyword" or not classifier:
        return None
    return classifier if HUB_ID.match(classifier["model"]) else None


def judge_input(wildcards=None):
    """The registered judge a job that judges refusals reads ([] when the judge needs none)."""
    return JUDGE_DIR if hub_judge() else []


def judge_settings():
    """The judge and its model (evaluation.settings.JudgeParams): the registered judge's directory for a hub model,
    else the configured model."""
    refusal = config["evaluation"]["refusal"]
    classifier = refusal["classifier"] or {}
    registered = hub_judge() is not None
    return {
        "judge": refusal["judge"],
        "classifier_model": JUDGE_DIR if registered else classifier.get("model"),
        "classifier_revision": None if registered else classifier.get("revision"),
        "refusal_label": classifier.get("refusal_label"),
    }


def _grid(name):
    return grid_of(config["attacks"][name])


def attack_cells(name):
    """{cell: {run, lr, rank, steps, seed}} for an attack's grid (tamperlab.attacks.grid names them)."""
    return grid.cells(*_grid(name))


def attack_runs(name):
    """{run: {lr, rank, seed, steps: [...]}} for an attack's grid."""
    return grid.runs(*_grid(name))


def all_runs(attacks):
    """Every run name of these attacks' grids (the {run} wildcard's values)."""
    return sorted({run for name in attacks for run in attack_runs(name)})


def one_job_attacks(one_job):
    """The attacks whose whole grid is one job (one_job: true), or those with a job per run."""
    return [n for n, spec in config["attacks"].items() if spec["one_job"] == one_job]
