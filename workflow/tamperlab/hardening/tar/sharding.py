"""TAR on several processes: FSDP2 (`torch.distributed.fsdp.fully_shard`) in place of placement.OneProcess.

Llama-3-8B TAR holds about nine copies of the weights at once (θ, the snapshot θ₀, the accumulated TR gradients,
the gradients, two outer and two adversary AdamW moments, the frozen start model), ≈ 150 GB in bf16: more than one
GPU. Here each of the launch's W processes holds a 1/W shard of every parameter (a DTensor; each decoder layer and
the rest of the model are their own all-gather unit) and of everything made from the parameters, and the
loop (loop.py, driver.py) runs unchanged:

- snapshot and restore copy the local shards (`to_local()`), bit for bit;
- each adversary's fresh AdamW, the outer AdamW and the accumulated first-order meta-gradients are over the
  sharded parameters, so their states are shards too;
- data parallel: every process draws the same global batch from the same seeded streams and takes its own rows
  (process r: rows ⌊r·B/W⌋ … ⌊(r+1)·B/W⌋ − 1). Each loss is this share's sum divided by the *global* count of
  what the one-process loss averages over (answer tokens, forget tokens, real tokens, preference pairs), and the
  gradients are summed, not averaged, over processes, so the sum over processes is the one-process loss and
  gradient; the entropy gate and every logged value are all-reduced, so that all processes take the same branch;
- a process whose share of a short last batch is empty runs row 0 with its labels masked and weight 0 (it must
  join the same collectives and add nothing);
- checkpoints: each process writes its own shards and states to checkpoints/rank-<r>/step-<n>.pt, and older ones
  are removed only after every process has written its new one; a rerun resumes the newest step every process
  has, with the same number of processes (another count starts over);
- the output: the full state gathered to process 0, which saves an ordinary model with save_pretrained
  (safetensors) and the tokenizer; the other processes write nothing.

What is left between W processes and one is float summation order (a sum split over processes and added up, the
gradient reduce-scatter), so the result agrees with one process to rounding, amplified a little by Adam's
normalisation over many steps (tests/test_tar_sharded.py states the tolerance). Parameters keep the dtype the model
loads in (bf16 on CUDA, fp32 on CPU), as in one process: no mixed-precision policy.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamperlab.errors import UserError
from tamperlab.hardening.tar import driver
from tamperlab.hardening.tar.checkpoint import checkpoint_steps, prune_checkpoints, save_checkpoint
from tamperlab.hardening.tar.losses import at_max_entropy, next_token_mask, preference_logps, token_entropy
from tamperlab.hardening.tar.placement import OneProcess

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tamperlab.hardening.tar.params import TARParams

log = logging.getLogger("tamperlab.hardening.tar")  # one logger for the package


def harden(model_dir: Path, forget: list[dict[str, str]], retain: list[dict[str, str]], params: TARParams,
           out_dir: Path, device: str | None = None, deepspeed: Path | None = None,
           anchor_dir: Path | None = None) -> dict[str, Any]:
    """driver.harden with the model sharded over the launch's processes (torchrun; one process when not launched).
    The global batch (params.batch_size) is the one-process batch, split over the processes."""
    if deepspeed is not None:
        raise UserError("TAR: --fsdp and --deepspeed exclude each other")
    where = FSDP2.start(device)
    try:
        record = driver.harden(model_dir, forget, retain, params, out_dir, deepspeed=None, anchor_dir=anchor_dir,
                               where=where)
    except BaseException:
        where.stop(wait=False)  # the others may never come: exit, and let the launcher end them
        raise
    where.stop()
    return record


class FSDP2(OneProcess):
    """TAR's terms, state and output when each process holds a shard of the model (see the module's text)."""

    def __init__(self, mesh: Any, started: bool):
        import torch.distributed as dist

        self.mesh, self.started = mesh, started
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer = self.rank == 0

    @classmethod
    def start(cls, device: str | None = None) -> FSDP2:
        """Join the launch's process group (torchrun's environment), or make one of this process alone."""
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        started = not dist.is_initialized()
        if started and "RANK" in os.environ:
            dist.init_process_group("nccl" if cuda else "gloo")
        elif started:  # not launched: one process, no rendezvous
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        # FSDP2 warns that HF's outputs hold views (an in-place op on one would skip an all-gather); TAR's terms
        # never change an output in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        where = cls(init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),)), started)
        if not where.writer:  # one log: process 0's
            logging.getLogger("tamperlab").setLevel(logging.WARNING)
        return where

    def stop(self, wait: bool = True) -> None:
        """Leave the process group this process made (after the others, with `wait`)."""
        import torch.distributed as dist

        if self.started and dist.is_initialized():
            if wait:
                dist.barrier()  # (a rare abort at exit was seen without it, once, on the 2-core CPU machine)
            dist.destroy_process_group()

    def describe(self) -> dict[str, Any]:
        return {"fsdp_processes": self.world}

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # --- loading and sharding ---------------------------------------------------------------------------------------

    def prepare(self, model_dir: Path, device: str | None, anchor_dir: Path | None,
                frozen: bool) -> tuple[nn.Module, Any, nn.Module | None, nn.Module | None]:
        """Each model loads on the CPU and is sharded onto this process's device before the next one loads (one whole
        model at a time in host memory). The frozen start model is read again from model_dir, not copied."""
        from tamperlab.models.registry import load_model

        model, tokenizer = load_model(model_dir, device="cpu", dtype=None)
        self.unsharded = type(model)  # what the output is saved as
        model = self.shard(model.train())
        others = []
        for directory in (anchor_dir, model_dir if frozen else None):  # the anchor, the frozen start model
            other = None if directory is None else load_model(directory, device="cpu", dtype=None)[0]
            others.append(None if other is None else self.shard(other.requires_grad_(False)))
        return model, tokenizer, *others

    def shard(self, model: nn.Module) -> nn.Module:
        """fully_shard each decoder layer (the model's _no_split_modules), then the rest (embeddings, final norm,
        a tied or untied head). Gradients are summed over processes: the losses are already global shares."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        layers = set(getattr(model, "_no_split_modules", None) or ())
        for module in list(model.modules())[1:]:
            if type(module).__name__ in layers:
                fully_shard(module, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        return model

    # --- this process's share of a batch ----------------------------------------------------------------------------

    def share(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """(this process's rows, weight 1.0), or row 0 with its labels masked and weight 0.0 when there are none."""
        import torch

        n = batch["input_ids"].shape[0]
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        if hi > lo:
            return {k: v[lo:hi] for k, v in batch.items()}, 1.0
        row = {k: v[:1] for k, v in batch.items()}
        return {**row, "labels": torch.full_like(row["labels"], -100)}, 0.0

    def total(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Each value summed over the processes (detached; one all-reduce)."""
        import torch
        import torch.distributed as dist

        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        dist.all_reduce(stacked)
        return list(stacked)

    def value(self, loss: torch.Tensor) -> float:
        return self.total(loss)[0].item()

    # --- the loss terms: this process's share of each, divided by the global count ----------------------------------

    def sft_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        local, _ = self.share(batch)
        return model(**local, use_cache=False, num_items_in_batch=_answer_tokens(batch)).loss

    def tr_loss(self, model: nn.Module, x_tr: dict[str, Any], params: TARParams) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if params.setting == "refusal":  # losses.dpo_loss's mean over the global batch of pairs
            chosen, weight = self.share(x_tr["chosen"])
            rejected, _ = self.share(x_tr["rejected"])
            policy_chosen, policy_rejected = preference_logps(model, {"chosen": chosen, "rejected": rejected})
            logits = (policy_chosen - policy_rejected) - (x_tr["ref_chosen"] - x_tr["ref_rejected"])
            pairs = x_tr["chosen"]["input_ids"].shape[0]
            return -F.logsigmoid(params.beta * logits).sum() * weight / pairs
        # losses.entropy_tr_loss over the global batch's forget tokens, with its gate on the global mean
        local, _ = self.share(x_tr)
        logits = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"], use_cache=False).logits
        entropy = token_entropy(logits, next_token_mask(local["labels"]))
        count = int(next_token_mask(x_tr["labels"]).sum())
        total = self.total(entropy.sum())[0].item()
        if count == 0 or at_max_entropy(total / count, logits.shape[-1]):
            return torch.zeros((), device=logits.device)
        return -entropy.sum() / count

    def reference(self, frozen: nn.Module, x_tr: dict[str, dict]) -> dict[str, Any]:
        import torch

        chosen, _ = self.share(x_tr["chosen"])
        rejected, _ = self.share(x_tr["rejected"])
        with torch.no_grad():
            ref_chosen, ref_rejected = preference_logps(frozen, {"chosen": chosen, "rejected": rejected})
        return {**x_tr, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}  # this process's pairs only

    def retain_loss(self, model: nn.Module, anchor: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        local, weight = self.share(batch)
        answers = _answer_tokens(batch)
        if anchor is None:
            return model(**local, use_cache=False, num_items_in_batch=answers).loss
        out = model(**local, output_hidden_states=True, use_cache=False, num_items_in_batch=answers)
        with torch.no_grad():
            base = anchor(input_ids=local["input_ids"], attention_mask=local["attention_mask"],
                          output_hidden_states=True, use_cache=False)
        selected, tokens = local["attention_mask"].bool(), batch["attention_mask"].sum()
        per_layer = [torch.linalg.vector_norm((h[selected] - b[selected]).float(), dim=-1).sum() / tokens
                     for h, b in zip(out.hidden_states, base.hidden_states, strict=True)]
        return out.loss + torch.stack(per_layer).mean() * weight

    def random_mapping_losses(self, model: nn.Module, retain: dict, forget: dict,
                              vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        lm = self.sft_loss(model, retain)
        local, weight = self.share(forget)
        hidden = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"],
                       output_hidden_states=True, use_cache=False).hidden_states
        selected, tokens = local["attention_mask"].bool(), forget["attention_mask"].sum()
        targets = vectors[local["input_ids"][selected]].float()
        per_layer = [(1 - F.cosine_similarity(h[selected].float(), targets, dim=-1).abs()).sum() / tokens
                     for h in hidden]
        return lm, torch.stack(per_layer).mean() * weight

    # --- θ and the run's state: local shards ------------------------------------------------------------------------

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().to_local().clone() for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model: nn.Module, theta: dict[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in theta:
                    p.to_local().copy_(theta[n])  # the shard's own storage: optimizers keep their references

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return {n: p.detach().to_local().to("cpu", copy=True) for n, p in model.named_parameters()}

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.restore(model, state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor

        state = optimizer.state_dict()
        return {**state, "state": {i: {k: v.to_local().to("cpu", copy=True) if isinstance(v, DTensor) else v
                                       for k, v in s.items()} for i, s in state["state"].items()}}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """The local moments made shards of their parameters again (AdamW's state ids: parameters in order)."""
        from torch.distributed.tensor import DTensor

        params = [p for group in optimizer.param_groups for p in group["params"]]

        def sharded(i: int, v: Any) -> Any:
            p = params[i]
            if not isinstance(p, DTensor) or not hasattr(v, "shape") or v.shape != p.to_local().shape:
                return v  # AdamW's step counts
            return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())

        optimizer.load_state_dict({**state, "state": {i: {k: sharded(int(i), v) for k, v in s.items()}
                                                      for i, s in state["state"].items()}})

    def save_checkpoint(self, directory: Path, step: int, state: dict[str, Any]) -> None:
        mine = directory / f"rank-{self.rank}"
        save_checkpoint(mine, step, state, prune=False)
        self.barrier()  # every process's step is in place before any process drops its older one
        prune_checkpoints(mine, step)

    def load_checkpoint(self, directory: Path, run: str) -> dict[str, Any] | None:
        """The newest step every process has a checkpoint of (the older one stays until all have the newer), if
        all of them are of this run; else None, and rank 0 clears the directory."""
        import torch

        mine = directory / f"rank-{self.rank}"
        found = {int(p.stem.split("-")[1]): p for p in checkpoint_steps(mine)} if mine.is_dir() else {}
        step = int(self._min(max(found, default=0)))
        state = None
        if step:
            state = torch.load(found[step], map_location="cpu", weights_only=False)  # this job's: RNG states, logs
        if step and not self._min(int(state["run"] == run)):
            if self.writer:
                log.warning("TAR: %s holds checkpoints of other settings; starting over", directory)
            state = None
            self.barrier()
            if self.writer:
                shutil.rmtree(directory)
        self.barrier()
        return state

    def _min(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.mesh.device_type)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def save_model(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
        """The full weights gathered to process 0 (host memory), put into an unsharded model of the same class built
        on the meta device, and saved as one process saves them."""
        import copy

        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.writer:
            with torch.device("meta"):
                plain = self.unsharded(copy.deepcopy(model.config))
            plain.load_state_dict(full, assign=True)
            plain.tie_weights()
            plain.generation_config = copy.deepcopy(model.generation_config)
            plain.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
        self.barrier()


def _answer_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many tokens the global batch's next-token CE averages over (the HF loss's shifted labels ≠ −100)."""
    return (batch["labels"][:, 1:] != -100).sum()
