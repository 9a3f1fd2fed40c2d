"""Where a loaded model's weights go: one device (`.to(device)`), or across the job's GPUs.

A model larger than one GPU (a 70B model is about 140 GB in bf16) is loaded with accelerate's big-model loading
(`device_map="auto"`): its layers are spread over the devices that `max_memory` names, each layer's weights on
its device, and accelerate's hooks move the activations from one device to the next. Nothing else changes: the
same generate() call, lm-eval's HFLM around the same model object, the landscape's perturbations applied to each
weight on its own device.

`--max-memory` is accelerate's max_memory as a JSON object, with one shorthand that the rules write for a job that
holds several GPUs (launch.inference_max_memory, from the job's `gpu` resource):

    {"gpus": 8}                          each of the first 8 visible GPUs at its free memory (accelerate's
                                         reading, balanced over the GPUs); nothing on the host or the disk
    {"0": "40GiB", "1": "40GiB"}         accelerate's own form: a budget per GPU index ...
    {"cpu": "2GiB"}                      ... and for the host; what does not fit goes to the disk

A model that does not fit what max_memory allows has some of its layers offloaded (to the host or the disk; their
weights then live with accelerate's hooks and the module holds `meta` tensors). Generation and lm-eval still run
(slowly); a landscape scan, which moves the weights in place, and a LoRA adapter (PEFT would rewrite the offloaded
weights' files) refuse such a model in one line (`offloaded`).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from tamperlab.errors import UserError

log = logging.getLogger(__name__)

HOST_KEYS = ("cpu",)  # max_memory keys other than GPU indices (accelerate also knows "mps", "xpu", ...)


def max_memory(spec: dict[str, Any] | None) -> dict[int | str, int | str] | None:
    """accelerate's max_memory from a --max-memory object (module docstring); None stays None (one device)."""
    if spec is None:
        return None
    memory: dict[int | str, int | str] = {}
    rest = dict(spec)
    gpus = rest.pop("gpus", None)
    if gpus is not None:
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise UserError(f"--max-memory: gpus must be an integer ≥ 1, got {gpus!r}")
        memory.update(_free_gpu_memory(gpus))
    for key, value in rest.items():
        if not (str(key).isdigit() or key in HOST_KEYS):
            raise UserError(f"--max-memory: {key!r} is not a GPU index, 'cpu' or 'gpus'")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UserError(f"--max-memory: {key}: expected bytes or a size such as '40GiB', got {value!r}")
        memory[int(key) if str(key).isdigit() else key] = value
    if not memory:
        raise UserError("--max-memory: names no device")
    return memory


def _free_gpu_memory(gpus: int) -> dict[int, int]:
    """{index: free bytes} of the first `gpus` visible GPUs: the job's (SLURM sets CUDA_VISIBLE_DEVICES)."""
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus:
        raise UserError(f"--max-memory: {gpus} GPUs asked for, {visible} visible (CUDA_VISIBLE_DEVICES)")
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    return {index: free[index] for index in range(gpus)}


def load_arguments(memory: dict[int | str, int | str] | None) -> dict[str, Any]:
    """from_pretrained's placement arguments: none for one device (the caller moves the model), else accelerate's
    big-model loading within `memory`."""
    if memory is None:
        return {}
    return {"device_map": "auto", "max_memory": memory}


def spread(model) -> dict[str, int]:
    """{device: number of weight tensors} of a model, offloaded ones under `meta` (logged after a split load)."""
    return dict(Counter(str(p.device) for p in model.parameters()))


def is_split(model) -> bool:
    """Whether a model was loaded across several devices (accelerate's hooks move activations between them)."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


def offloaded(model) -> list[str]:
    """The weights that live off the model (with accelerate's offload hooks), not on a device."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def input_device(model):
    """Where a model's inputs go: the device its input embedding runs on (a model split across devices starts
    there; accelerate's hook records it even where the embedding's weights are offloaded), else its first weight's
    device."""
    import torch

    embedding = model.get_input_embeddings()
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
    return embedding.weight.device


def log_spread(model) -> None:
    counts = spread(model)
    log.info("model loaded across devices: %s", ", ".join(f"{d}: {n} tensors" for d, n in sorted(counts.items())))
    if "meta" in counts:
        log.warning("%d weight tensors are offloaded (host or disk): generation runs, slowly; give the job more "
                    "GPU memory", counts["meta"])
