"""TAR — Tamper-Resistant Safeguards for Open-Weight LLMs (Tamirisa et al., 2024), as the authors' code runs it.

Adversarial meta-learning, first order: each outer step samples N train-time adversaries, lets each fine-tune a copy
of θ for K steps while the tamper-resistance loss L_TR on held-out forget data is evaluated along the way, restores
θ, and takes one outer step on the retain loss plus the accumulated L_TR gradients. Two settings: knowledge
(L_TR = −entropy on forget text, after the Random Mapping safeguard) and refusal (L_TR = DPO, refusal ≻ compliance).

    params.py      TARParams (the authors' constants), Adversary and how adversaries are sampled
    data.py        encoding, the held-out x_TR split, endless seeded batch streams
    losses.py      L_TR (entropy, DPO), L_retain, Random Mapping, the adversary's SFT loss
    loop.py        Algorithm 1: the inner adversary steps and the outer meta step; Random Mapping's training
    placement.py   OneProcess: where the model lives when one process holds all of it
    sharding.py    FSDP2: the same loop with every parameter sharded over torchrun's processes (`--fsdp`)
    checkpoint.py  checkpoint files and global RNG states (resume bit for bit)
    driver.py      harden: models, data, the outer loop, its log, checkpoints and output

Departures from the authors' code (the pitfalls the paper's re-evaluations list, plus what a single process needs)
are listed in the module whose code makes them: data.py, losses.py, params.py, driver.py.
"""

from tamperlab.hardening.tar.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from tamperlab.hardening.tar.data import BatchStream, TARData, collate, collate_preference, encode_row, make_data
from tamperlab.hardening.tar.driver import TAR_LOG, harden
from tamperlab.hardening.tar.loop import (
    adversary_inner_loop,
    clock,
    random_mapping_safeguard,
    tar_outer_step,
    tr_weight,
)
from tamperlab.hardening.tar.losses import (
    ENTROPY_TOLERANCE,
    dpo_loss,
    entropy_tr_loss,
    next_token_mask,
    random_mapping_loss,
    random_vectors,
    representation_distance,
    retain_loss,
    sequence_logps,
    sft_loss,
    tamper_resistance_loss,
    with_reference_logps,
)
from tamperlab.hardening.tar.params import FORGET, SETTINGS, SWITCH, Adversary, TARParams, sample_adversary
from tamperlab.hardening.tar.placement import ONE_PROCESS, OneProcess, restore, snapshot

__all__ = [
    "ENTROPY_TOLERANCE", "FORGET", "ONE_PROCESS", "SETTINGS", "SWITCH", "TAR_LOG", "Adversary", "BatchStream",
    "OneProcess", "TARData", "TARParams", "adversary_inner_loop", "clock", "collate", "collate_preference",
    "dpo_loss", "encode_row", "entropy_tr_loss", "harden", "load_checkpoint", "make_data", "next_token_mask",
    "random_mapping_loss", "random_mapping_safeguard", "random_vectors", "representation_distance", "restore",
    "retain_loss", "rng_states", "sample_adversary", "save_checkpoint", "sequence_logps", "set_rng_states",
    "sft_loss", "snapshot", "tamper_resistance_loss", "tar_outer_step", "tr_weight", "with_reference_logps",
]
