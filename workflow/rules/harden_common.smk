"""Parameter functions of the defence rules (workflow/rules/harden.smk): which defences train here (the method
registry says), their --params (the rows trained on and the method's block), launcher and anchor."""

from tamperlab import methods
from tamperlab.runtime import launch


def defences_from(*sources):
    """Defences that train (source train) or stand in a released checkpoint (hf, local); none is neither."""
    return [
        name
        for name, spec in config["defences"].items()
        if methods.get("defence", spec["method"]).trains and spec["source"] in sources
    ]


def harden_args(wildcards):
    """The defence's method, and as --params the rows it trains on (data: tamperlab.data.examples.DefenceData) and
    its method's block (method: the method's dataclass)."""
    spec = config["defences"][wildcards.defence]
    model = config["models"][wildcards.model]
    # null: the refusal the model learnt first (the organism's, or its safety tuning's)
    refusals = (model.get("organism") or model.get("align") or {}).get("refusals")
    data = {
        "splits": spec["splits"],
        "harmful_response": spec["harmful_response"],
        "refusal": spec["refusal"] or (refusals or [None])[0],
        "forget_family": spec["forget_family"],
    }
    if spec["benign_retain"]:  # only where set: a hardening recorded before the variant replays as it ran
        data["benign_retain"] = True
    method = spec[methods.get("defence", spec["method"]).block]
    return cli_flags(
        {
            "method": spec["method"],
            "params": {"data": data, "method": method},
            "benign_answers": harden_answers(wildcards) or None,
        }
    )


def harden_answers(wildcards):
    """benign_retain with a generator: its answers to each of the defence's splits' benign prompts."""
    spec = config["defences"][wildcards.defence]
    retain = spec["benign_retain"]
    if not retain or retain["generator"] is None:
        return []
    return [responses_path(retain["generator"], wildcards.model, split, "benign") for split in spec["splits"]]


def harden_launcher(wildcards):
    """TAR on a model that trains sharded starts under torchrun (FSDP2, launch.tar_torchrun); the rest as launcher."""
    torchrun = launch.tar_torchrun(config, wildcards.model, wildcards.defence)
    return f"{torchrun} {NUMERICS}" if torchrun else launcher(wildcards)


def harden_sharding_flags(wildcards):
    """--fsdp where harden_launcher chose torchrun (TAR sharded by FSDP2, not ZeRO-3), else zero3_flags."""
    if launch.tar_torchrun(config, wildcards.model, wildcards.defence):
        return "--fsdp"
    return zero3_flags(wildcards)


def harden_anchor(wildcards):
    """TAR's representation anchor (defences.<d>.anchor), a model of this config; none: the start model."""
    anchor = config["defences"][wildcards.defence].get("anchor")
    return f"results/models/{anchor}/base" if anchor else []
