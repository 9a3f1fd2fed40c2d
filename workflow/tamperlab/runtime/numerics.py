"""CPU numerics: which kernels a job's floating-point arithmetic runs on, pinned before torch loads.

torch's CPU wheel does matrix products in MKL, elementwise kernels in ATen and a few ops in oneDNN, and each picks
its code by the CPU it finds (MKL by vendor as well as by instruction set). The organism's training amplifies one
changed last bit into cells far outside their sampling intervals, so a run on another CPU kind was "not
reproduced" before a single line of the method changed. Two modes (`cpu.numerics`, `tamperlab --numerics`):

- **portable** (the default): every CPU job runs code that any x86-64 CPU with AVX2 computes the same way:
  MKL_CBWR=COMPATIBLE (MKL's conditional-numerical-reproducibility branch documented as identical on Intel and
  non-Intel CPUs; its AVX2 branch falls back to the CPU's own on non-Intel ones), ATEN_CPU_CAPABILITY=avx2 (ATen's
  AVX2 kernels: compiled code, chosen by instruction set only), ONEDNN_MAX_CPU_ISA=AVX2. MKL's COMPATIBLE branch
  is SSE2 code: matrix products run at about 0.4x native speed (docs/benchmarks.md).
- **native**: the CPU's fastest kernels; bit-exact on the same CPU kind only.

The settings are environment variables that MKL, ATen and oneDNN read once, when torch first uses them, so `pin`
runs before torch is imported (cli.main). `fingerprint` hashes a fixed set of kernels (matrix products, attention,
softmax and cross-entropy with their backward passes, RMS norm, SiLU, seeded random draws, an AdamW update) on
inputs made by integer arithmetic: two processes whose fingerprints agree run the same kernels bit for bit.
Every manifest records the mode, the settings and the fingerprint (`describe`).
"""

from __future__ import annotations

import hashlib
import os
import sys

MODES = ("portable", "native")
DEFAULT = "portable"
PORTABLE = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODE_VARIABLE = "TAMPERLAB_NUMERICS"  # the mode in force, for the manifest and for child processes
# The portable fingerprint per thread count (MKL's COMPATIBLE branch splits some products by thread count), as
# measured on every CPU kind that has run it (reference/default/SOURCE.md); tests/test_numerics.py checks a fresh
# process against it: a CPU that computes other bits under portable numerics fails there first.
PORTABLE_FINGERPRINTS = {1: "f1c45cd994ed07e5", 2: "32b8abdec18ec23d"}


def pin(mode_: str, environ=os.environ) -> None:
    """Set the CPU numerics of this process (and the processes it starts) before torch is imported."""
    if mode_ not in MODES:
        raise ValueError(f"numerics {mode_!r}: expected one of {', '.join(MODES)}")
    if "torch" in sys.modules and environ is os.environ:
        if mode(environ) == mode_ and (mode_ == "native" or all(environ.get(k) == v for k, v in PORTABLE.items())):
            return  # already in force (a command called in-process by a test session pinned the same way)
        raise RuntimeError("numerics must be pinned before torch is imported: MKL and ATen read them once")
    if mode_ == "portable":
        environ.update(PORTABLE)
    elif environ.get(MODE_VARIABLE) == "portable":  # inherited from a portable parent: not the user's own settings
        for name in PORTABLE:
            environ.pop(name, None)
    environ[MODE_VARIABLE] = mode_


def mode(environ=os.environ) -> str:
    """The mode this process was started under (native where nothing pinned it)."""
    return environ.get(MODE_VARIABLE, "native")


def _inputs(*shape: int, salt: int = 0):
    """A float tensor of `shape` in [-1, 1) from integer arithmetic: the same bits on every CPU and capability
    (torch's random draws are not: its normal sampler is vectorised per instruction set)."""
    import torch

    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int64) + salt * 7919
    return (((index * 2654435761) % 65536).to(torch.float32) / 32768.0 - 1.0).reshape(shape)


def fingerprint() -> str:
    """sha256 (16 hex digits) of a fixed set of kernels' outputs: equal fingerprints, equal kernels."""
    import torch
    import torch.nn.functional as F

    with torch.random.fork_rng(devices=[]):
        digest = hashlib.sha256()

        def add(*tensors):
            for tensor in tensors:
                digest.update(tensor.detach().contiguous().numpy().tobytes())

        a, b = _inputs(96, 128, salt=1), _inputs(128, 512, salt=2)
        add(a @ b, a.t() @ _inputs(96, 300, salt=3), torch.bmm(_inputs(4, 33, 64, salt=4), _inputs(4, 64, 17, salt=5)))
        x = _inputs(2, 24, 128, salt=6).requires_grad_()
        weight = _inputs(384, 128, salt=7).mul(0.1).requires_grad_()
        q, k, v = F.linear(x, weight).view(2, 24, 3, 4, 32).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = attended.transpose(1, 2).reshape(2, 24, 128)
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = F.linear(F.silu(normed), _inputs(300, 128, salt=8))
        targets = torch.arange(48) * 7 % 300
        loss = F.cross_entropy(logits.view(48, 300), targets) + torch.softmax(logits, -1).pow(2).sum() * 1e-3
        loss.backward()
        add(logits, loss, x.grad, weight.grad)
        generator = torch.Generator().manual_seed(0)
        add(torch.randn(1000, generator=generator), torch.rand(1000, generator=generator))
        # AdamW's update as torch.optim computes it on CPU (its optimizer class would import the compiler: 2 s)
        parameter, gradient = _inputs(64, 64, salt=9), _inputs(64, 64, salt=10)
        average = torch.zeros_like(parameter).lerp_(gradient, 0.1)
        square = torch.zeros_like(parameter).mul_(0.999).addcmul_(gradient, gradient, value=0.001)
        parameter.mul_(1 - 1e-5).addcdiv_(average, (square.sqrt() / 0.001 ** 0.5).add_(1e-8), value=-0.01)
        add(parameter, torch.exp(a), torch.log_softmax(a, -1))
    return digest.hexdigest()[:16]


def describe() -> dict:
    """What a manifest records: the mode, the settings in force, and, where the step computed with torch, its
    threads, ATen's capability and the fingerprint (a step that never loaded torch computed no floats with it, and
    loading it only to record this would cost such a step seconds)."""
    if "torch" in sys.modules:
        return describe_now()
    return {"mode": mode(), "settings": {name: os.environ.get(name) for name in PORTABLE}, "threads": None,
            "aten_capability": None, "fingerprint": None}


def describe_now() -> dict:
    """describe(), loading torch if it is not loaded yet."""
    import torch

    return {"mode": mode(), "settings": {name: os.environ.get(name) for name in PORTABLE},
            "threads": torch.get_num_threads(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "fingerprint": fingerprint()}


def expectation(ours: dict | None, theirs: dict | None) -> str:
    """What two runs' numerics let one expect of their numbers, in one line (compare and replay print it)."""
    if not ours or not theirs:
        return "numerics not recorded on both sides: bit-exact not expected, judged by spread"
    if ours.get("fingerprint") != theirs.get("fingerprint"):
        return (f"numerics differ ({ours.get('mode')} {ours.get('fingerprint')} vs {theirs.get('mode')} "
                f"{theirs.get('fingerprint')}): bit-exact not expected, judged by spread")
    return f"same numerics ({ours.get('mode')}, fingerprint {ours.get('fingerprint')}): bit-exact expected"
