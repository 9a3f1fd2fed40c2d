"""How a training step is launched, by model size: the same `tamperlab` subcommand, one process or several.

A rule's shell starts with `launcher(...)` where it would say `tamperlab`, and adds `zero3_arguments(...)` to the
subcommand's flags. Only the launch changes with size, never the code (docs/scale-out.md):

    size   processes (one per GPU)   ZeRO-3                  command
    tiny   1 (CPU)                    off; on by config       tamperlab ...
    7b     1                          off; on by config       tamperlab ...
    13b    2                          on;  off by config      accelerate launch ... -m tamperlab.cli ... --deepspeed C
    70b    8                          always                  accelerate launch ... -m tamperlab.cli ... --deepspeed C

Inference (evaluations, responses, landscape scans) runs in one process at every size: on a job with several GPUs
the model is loaded across them (`inference_max_memory`, models/placement.py), each layer on one GPU.

Under ZeRO-3 the launcher is `accelerate launch` (its DeepSpeed launcher runs torch.distributed.run on one node) and
the subcommand gets `--deepspeed CONFIG`, which the HF Trainer reads: it fills the config's "auto" values from its
own arguments, shards the model at load (zero.Init) and trains; saves gather the shards into ordinary HF/PEFT
files (stage3_gather_16bit_weights_on_model_save). On a host without GPUs the processes talk over gloo (CI does
this with 2 processes); set DS_ACCELERATOR=cpu there.

Pure Python (no torch import): common.smk imports it.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab import methods
from tamperlab.errors import UserError

ZERO3_CONFIG = Path(__file__).parents[1] / "deepspeed" / "zero3.json"  # the default; "auto" values: the Trainer's


@dataclass(frozen=True)
class SizeClass:
    processes: int  # default processes to start, one per GPU (tiny: one CPU process)
    zero3: bool  # ZeRO-3 unless the config says otherwise
    zero3_required: bool  # the model does not train without sharding


SIZE_CLASSES = {
    "tiny": SizeClass(processes=1, zero3=False, zero3_required=False),
    "7b": SizeClass(processes=1, zero3=False, zero3_required=False),
    "13b": SizeClass(processes=2, zero3=True, zero3_required=False),
    "70b": SizeClass(processes=8, zero3=True, zero3_required=True),
}


def size_class(size: str) -> SizeClass:
    if size not in SIZE_CLASSES:
        raise UserError(f"size {size!r}: expected one of {', '.join(SIZE_CLASSES)}")
    return SIZE_CLASSES[size]


def uses_zero3(size: str, zero3: bool | None) -> bool:
    """Whether a model of this size trains under ZeRO-3: the config's choice (zero3) or the size's default."""
    spec = size_class(size)
    if zero3 is False and spec.zero3_required:
        raise UserError(f"size {size}: trains under DeepSpeed ZeRO-3 only (zero3: false is not possible)")
    return spec.zero3 if zero3 is None else zero3


def processes(size: str, zero3: bool | None, gpus: int | None) -> int:
    """How many processes a step starts: gpus when given (> 0), else the size's default."""
    count = gpus if gpus else size_class(size).processes
    if count < 1:
        raise UserError(f"size {size}: gpus must be ≥ 1, got {count}")
    if count > 1 and not uses_zero3(size, zero3):
        raise UserError(f"size {size}: {count} processes need ZeRO-3 (zero3: true); without it one process trains")
    return count


def launcher(size: str, zero3: bool | None, gpus: int | None, config_path: str | Path | None) -> str:
    """The command that stands where a rule says `tamperlab`: itself for one plain process, else `accelerate
    launch` of tamperlab.cli on `processes(...)` processes with DeepSpeed on (the subcommand also needs
    `zero3_arguments(...)`). A free port is picked per launch, so several launches can share a node."""
    count = processes(size, zero3, gpus)
    if not uses_zero3(size, zero3):
        return "tamperlab"
    config = shlex.quote(str(_required(config_path, size)))
    return (f"accelerate launch --num_processes {count} --num_machines 1 --main_process_port 0 "
            f"--use_deepspeed --deepspeed_config_file {config} -m tamperlab.cli")


def zero3_arguments(size: str, zero3: bool | None, config_path: str | Path | None) -> str:
    """The subcommand's flags for the launch: `--deepspeed CONFIG` under ZeRO-3, else nothing."""
    if not uses_zero3(size, zero3):
        return ""
    return f"--deepspeed {shlex.quote(str(_required(config_path, size)))}"


def torchrun_launcher(processes: int) -> str:
    """The command that stands where a rule says `tamperlab` for TAR on `processes` processes of one node
    (add `--fsdp` to `harden`): torchrun, a free rendezvous port per launch (--standalone)."""
    if processes < 1:
        raise UserError(f"TAR under FSDP2: processes must be ≥ 1, got {processes}")
    return f"torchrun --standalone --nproc_per_node {processes} -m tamperlab.cli"


def tar_torchrun(config: dict[str, Any], model: str, defence: str) -> str | None:
    """The launcher of the workflow's harden job for (model, defence): for TAR on a model that trains sharded
    (models.<m>.zero3, or its size class), torchrun on as many processes as the model's other training jobs, with
    `--fsdp` (FSDP2 instead of ZeRO-3: hardening/tar/sharding.py); None for anything else (the size class's
    launcher)."""
    spec = config["models"][model]
    sharded = methods.get("defence", config["defences"][defence]["method"]).sharded_run is not None
    if not sharded or not uses_zero3(spec["size"], spec["zero3"]):
        return None
    return torchrun_launcher(processes(spec["size"], spec["zero3"], spec["gpus"]))


def inference_max_memory(gpus: int) -> dict[str, int] | None:
    """--max-memory of a step that loads a model for inference (evaluation, responses, landscape) on a job holding
    `gpus` GPUs: spread over all of them when there are several (models/placement.py reads it), else None (the
    model on its one device). The job's `gpu` resource, so the model is loaded across exactly the GPUs that the
    scheduler gives the job (a 70B model, ~140 GB in bf16, over a node's 8)."""
    return {"gpus": gpus} if gpus > 1 else None


def _required(config_path: str | Path | None, size: str) -> str | Path:
    if not config_path:
        raise UserError(f"size {size}: ZeRO-3 needs a DeepSpeed config file")
    return config_path


# ---------------------------------------------------------------------------------------------------------------------
# The ZeRO-3 config: the packaged default, optionally overridden key by key, written as the JSON DeepSpeed reads


def zero3_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default ZeRO-3 config with overrides merged in (nested dicts key by key), e.g. CPU offload for 70b:
    {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}."""
    return check_zero3(_merge(json.loads(ZERO3_CONFIG.read_text()), overrides or {}), "zero3 config")


def write_zero3_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the config (sorted keys: the same config gives the same bytes) where a rule's --deepspeed points."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(zero3_config(overrides), indent=2, sort_keys=True) + "\n")
    return path


def read_zero3_config(path: Path) -> dict[str, Any]:
    """A DeepSpeed config file, checked to be one whose saves are ordinary model files (see `check_zero3`)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: DeepSpeed config does not exist") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: DeepSpeed config is not valid JSON ({error})") from None
    return check_zero3(config, str(path))


def check_zero3(config: Any, where: str) -> dict[str, Any]:
    """ZeRO stage 3 with the 16-bit weights gathered on save: anything else would write sharded checkpoints
    instead of the model files that evaluations load."""
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        raise UserError(f"{where}: zero_optimization.stage must be 3")
    if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError(f"{where}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true "
                        "(saves would be shards, not model files)")
    return config


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# This process's place in a launch (the launchers set RANK and WORLD_SIZE; a plain process is rank 0 of 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Whether this process writes files: rank 0 only, so that several processes never write the same path."""
    return rank() == 0
