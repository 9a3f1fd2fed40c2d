"""Portable CPU numerics (runtime.numerics): pinned before torch loads, the same bits under any restriction of the
instruction set, and the fingerprint every CPU kind has computed so far (a CPU that computes other bits fails here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tamperlab.runtime import numerics
from tamperlab.runtime.cpu import fit_threads


def _numerics(mode: str, threads: int, **environment: str) -> dict:
    """`tamperlab --numerics MODE numerics --json` in a fresh process (the settings are read once, at start)."""
    env = {k: v for k, v in os.environ.items() if k not in (*numerics.PORTABLE, numerics.MODE_VARIABLE)}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **environment)
    result = subprocess.run([sys.executable, "-m", "tamperlab.cli", "--numerics", mode, "numerics", "--json"],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout)


def test_pin_sets_the_three_libraries_and_the_mode():
    environ: dict[str, str] = {}
    numerics.pin("portable", environ)
    assert environ == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                       "TAMPERLAB_NUMERICS": "portable"}
    environ = {"MKL_CBWR": "AVX2"}  # a user's own setting stands under native
    numerics.pin("native", environ)
    assert environ == {"MKL_CBWR": "AVX2", "TAMPERLAB_NUMERICS": "native"}
    environ = {**numerics.PORTABLE, "TAMPERLAB_NUMERICS": "portable"}  # a portable parent's are dropped
    numerics.pin("native", environ)
    assert environ == {"TAMPERLAB_NUMERICS": "native"}
    with pytest.raises(ValueError, match="expected one of portable, native"):
        numerics.pin("fast", {})


def test_pin_refuses_other_numerics_once_torch_is_loaded():
    import torch  # noqa: F401  (loaded by the test session anyway)

    with pytest.raises(RuntimeError, match="before torch is imported"):
        numerics.pin("native")  # the session runs portable (conftest)
    numerics.pin("portable")  # what is in force already: nothing to do


@pytest.mark.parametrize("threads", [1, 2])
def test_a_portable_process_computes_the_fingerprint_every_cpu_kind_has_computed(threads):
    """The cross-machine check: matrix products, attention, softmax and cross-entropy with their backward passes,
    RMS norm, random draws and an AdamW update hash to what they hashed on the CPUs listed in
    reference/default/SOURCE.md."""
    pinned = _numerics("portable", threads)
    assert pinned["mode"] == "portable" and pinned["aten_capability"] == "AVX2" and pinned["threads"] == threads
    assert pinned["settings"] == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert pinned["fingerprint"] == numerics.PORTABLE_FINGERPRINTS[threads], (
        "this CPU computes other bits under portable numerics: record it in reference/default/SOURCE.md and find "
        "which kernel")


def test_portable_bits_do_not_depend_on_the_instruction_sets_mkl_may_use():
    """MKL restricted to SSE4.2 or AVX2 computes the portable bits too: the pinned branch is not the CPU's; native
    numerics on this machine compute others."""
    portable = _numerics("portable", 1)["fingerprint"]
    for isa in ("SSE4_2", "AVX2"):
        assert _numerics("portable", 1, MKL_ENABLE_INSTRUCTIONS=isa)["fingerprint"] == portable
    native = _numerics("native", 1)
    assert native["mode"] == "native" and native["settings"]["MKL_CBWR"] is None
    assert native["fingerprint"] != portable


def test_the_thread_count_is_part_of_portable_numerics():
    """MKL's COMPATIBLE branch splits some small products by thread count: a portable job keeps its rule's
    threads even where cores are busy (its threads sleep instead), where a native one takes fewer."""
    assert numerics.PORTABLE_FINGERPRINTS[1] != numerics.PORTABLE_FINGERPRINTS[2]
    environ = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert fit_threads(environ, probe=lambda: 1.0, portable=True) == 2
    assert environ == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_NUM_THREADS": "2"}
    assert fit_threads(environ, probe=lambda: 2.0, portable=True) == 2 and environ == {"OMP_NUM_THREADS": "2"}
    environ = {"OMP_NUM_THREADS": "2"}
    assert fit_threads(environ, probe=lambda: 1.0) == 1 and environ["OMP_NUM_THREADS"] == "1"
    environ = {}  # a command run by hand: one thread, whatever the machine's cores
    fit_threads(environ, probe=lambda: 8.0, portable=True)
    assert environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_expectation_says_bit_exact_only_for_equal_fingerprints():
    portable = {"mode": "portable", "fingerprint": "a"}
    assert numerics.expectation(portable, dict(portable)).endswith("bit-exact expected")
    assert "bit-exact not expected" in numerics.expectation(portable, {"mode": "native", "fingerprint": "b"})
    assert "not recorded" in numerics.expectation(portable, None)
