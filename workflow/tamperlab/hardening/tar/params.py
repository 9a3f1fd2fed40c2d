"""TAR's settings (`TARParams`) and the train-time adversaries it samples from them (`Adversary`).

Constants from the authors' scripts. run_tar_bio.sh (the defaults here): K = 64, tr_every = 4, schedule 0.0625,
λ_TR = 4, adversary lr ∈ {2e-6, 2e-5, 4e-5}, switch share 0.33 with M ~ Beta(6, 3)·K, outer lr 2e-5 with 32 warmup
steps, N = 1, retain loss with the representation term, starting from the Random-Mapped checkpoint.
run_tar_dpo.sh (refusal; in the repository's history at fae6509, deleted by the next commit): K = 8 with L_TR at
every inner step (tar_inner_loop_subsample 1), λ_TR = 0.1, outer lr 6e-5, 100 outer steps, N = 2, harmful
completions only (switch share 0), batch 4 × 2 accumulation steps, and no --retain_representations (retain loss =
CE only). The paper's Table 12 (via TamperBench) lists K = 64 and batch 64 for this setting instead. N in
"w_j / N" is the number of adversaries sampled per outer step (tar_num_tasks_sampled), as in the code and in the
paper's Algorithm 1.

One batch size serves the adversary, the TR batch and the retain batch (a departure: the bio script uses 4 for the
adversary, 8 elsewhere).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tamperlab.errors import UserError

SETTINGS = ("knowledge", "refusal")
FORGET, SWITCH = "forget", "retain_forget_switch"  # adversary data types
SWITCH_BETA = (6.0, 3.0)  # M ~ Beta(6, 3)·K: the switch adversary spends most of its budget on retain data first


@dataclass
class TARParams:
    setting: str = "knowledge"  # knowledge (entropy L_TR) | refusal (DPO L_TR)
    outer_steps: int = 750  # bio 750, refusal 100
    inner_steps: int = 64  # K adversary steps per sampled adversary
    tr_every: int = 4  # evaluate L_TR after every tr_every-th inner step
    lambda_tr: float = 4.0  # bio 4.0, refusal 0.1
    lambda_retain: float = 1.0
    outer_lr: float = 2e-5  # refusal 6e-5
    warmup_steps: int = 32  # linear warmup of the outer lr
    adversary_lrs: Sequence[float] = (2e-6, 2e-5, 4e-5)
    switch_fraction: float = 0.33  # probability of the retain→forget switch adversary (refusal script: 0)
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    beta: float = 0.1  # DPO temperature
    adversaries_per_step: int = 1  # N in λ_TR·w_j/N (bio 1, refusal 2)
    schedule_lambda: float = 0.0625  # w_j = exp(schedule_lambda · (j − (K−1)))
    holdout_fraction: float = 0.25  # share of the forget rows kept out of the adversary's reach, for x_TR
    random_mapping_steps: int = 0  # knowledge: Random Mapping steps run before TAR (0: the model has it already)
    random_mapping_lr: float = 2e-5
    retain_representations: bool = True  # L_retain's ‖h_θ − h_anchor‖ term (bio script: on; DPO script: off)
    checkpoint_every: int = 25  # outer steps between resumable checkpoints (no effect on the result)

    def record(self) -> dict[str, Any]:
        """The settings as plain JSON values (adversary_lrs a list, whatever sequence it was given as)."""
        return {**asdict(self), "adversary_lrs": list(self.adversary_lrs)}

    def check(self) -> None:
        """Refuse settings the loop cannot run, before any model is loaded."""
        if self.setting not in SETTINGS:
            raise UserError(f"TAR: unknown setting {self.setting!r} (expected one of {', '.join(SETTINGS)})")
        if self.tr_every < 1 or self.inner_steps < self.tr_every:
            raise UserError(f"TAR: inner_steps ({self.inner_steps}) must be ≥ tr_every ({self.tr_every}) ≥ 1")
        if self.checkpoint_every < 1:
            raise UserError(f"TAR: checkpoint_every must be ≥ 1 (got {self.checkpoint_every})")


@dataclass
class Adversary:
    """One train-time attack: SFT on `data` at a constant `lr`; the switch adversary trains on retain data for its
    first `switch_step` (M) steps, then on forget data."""

    data: str
    lr: float
    switch_step: int | None = None

    def uses_retain(self, j: int) -> bool:
        return self.switch_step is not None and j < self.switch_step


def sample_adversary(rng: random.Random, params: TARParams) -> Adversary:
    """Data type from the mixture (switch with probability switch_fraction), lr uniform over adversary_lrs,
    switch point M = ⌊Beta(6, 3)·K⌋ for the switch adversary."""
    data = SWITCH if rng.random() < params.switch_fraction else FORGET
    lr = rng.choice(list(params.adversary_lrs))
    switch_step = int(rng.betavariate(*SWITCH_BETA) * params.inner_steps) if data == SWITCH else None
    return Adversary(data=data, lr=lr, switch_step=switch_step)
