"""Manifests: atomic outputs, what a manifest records, and how inputs are verified against it."""

from __future__ import annotations

import json
import os

import pytest

from tamperlab.errors import UserError
from tamperlab.runtime.provenance import (
    MANIFEST_NAME,
    Step,
    hash_output,
    manifest_path,
    read_manifest,
    sha256_file,
    verify_input,
)


def _leftovers(directory):
    """Temporary files a step may leave behind (`.<name>.tmp-<pid>`)."""
    return sorted(p.name for p in directory.rglob("*") if ".tmp-" in p.name)


def _file_step(tmp_path, name="x.json", params=None, text='{"a": 1}\n'):
    out = tmp_path / "d" / name
    with Step("make-file", params or {"seed": 3, "alpha": 0.5}, inputs={}, outputs={"out": out}) as step:
        step.path("out").write_text(text)
    return out


def _dir_step(tmp_path, files=None):
    out = tmp_path / "model"
    files = files or {"config.json": "{}\n", "weights.bin": "0123", "sub/extra.txt": "hello"}
    with Step("make-dir", {"seed": 1}, inputs={}, outputs={"model": out}, outputs_are_dirs=("model",)) as step:
        for rel, text in files.items():
            target = step.path("model") / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    return out


# --- atomic outputs ------------------------------------------------------------------------------------------


def test_failed_file_step_leaves_no_output_no_manifest_and_no_temp_path(tmp_path):
    out = tmp_path / "d" / "x.json"
    with pytest.raises(ValueError, match="boom"):
        with Step("make-file", {}, inputs={}, outputs={"out": out}) as step:
            tmp = step.path("out")
            assert tmp != out and tmp.parent == out.parent
            tmp.write_text("partial")
            raise ValueError("boom")
    assert not out.exists()
    assert not manifest_path(out).exists()
    assert not tmp.exists()
    assert _leftovers(tmp_path) == []


def test_failed_directory_step_leaves_no_output_no_manifest_and_no_temp_dir(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="died"):
        with Step("make-dir", {}, inputs={}, outputs={"model": out}, outputs_are_dirs=("model",)) as step:
            tmp = step.path("model")
            assert tmp.is_dir()  # a directory output gets its temp directory made
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("died")
    assert not out.exists()
    assert not (out / MANIFEST_NAME).exists()
    assert not tmp.exists()
    assert _leftovers(tmp_path) == []


def test_output_appears_only_when_the_step_succeeds(tmp_path):
    out = tmp_path / "d" / "x.json"
    with Step("make-file", {}, inputs={}, outputs={"out": out}) as step:
        step.path("out").write_text("done")
        assert not out.exists()  # still under its temporary name inside the step
        assert not manifest_path(out).exists()
    assert out.read_text() == "done"
    assert not step.path("out").exists()
    assert _leftovers(tmp_path) == []


def test_step_that_writes_no_output_raises_and_writes_no_manifest(tmp_path):
    out = tmp_path / "d" / "x.json"
    with pytest.raises(RuntimeError, match="'out'"):
        with Step("lazy", {}, inputs={}, outputs={"out": out}):
            pass
    assert not out.exists()
    assert not manifest_path(out).exists()


def test_failed_rerun_leaves_the_previous_complete_output_verifiable(tmp_path):
    out = _file_step(tmp_path, text="first")
    with pytest.raises(ValueError):
        with Step("make-file", {}, inputs={}, outputs={"out": out}) as step:
            step.path("out").write_text("second, half")
            raise ValueError("crash")
    assert out.read_text() == "first"
    verify_input(out)


# --- manifest content -------------------------------------------------------------------------------------------


def test_manifest_path_sits_beside_a_file_and_inside_a_directory(tmp_path):
    assert manifest_path(tmp_path / "d" / "x.json") == tmp_path / "d" / "x.manifest.json"
    assert manifest_path(tmp_path / "d" / "refusal.jsonl") == tmp_path / "d" / "refusal.manifest.json"
    (tmp_path / "model.v1").mkdir()
    assert manifest_path(tmp_path / "model.v1") == tmp_path / "model.v1" / MANIFEST_NAME
    assert manifest_path(tmp_path / "not-yet") == tmp_path / "not-yet" / MANIFEST_NAME


def test_file_step_manifest_records_status_params_hash_versions_and_timing(tmp_path):
    params = {"seed": 3, "alpha": 0.5, "names": ["a", "b"]}
    out = tmp_path / "d" / "x.json"
    with Step("make-file", params, inputs={}, outputs={"out": out}) as step:
        with step.phase("work"):
            step.path("out").write_text('{"a": 1}\n')
        step.results = {"rows": 1}
    manifest_file = tmp_path / "d" / "x.manifest.json"
    assert manifest_file.is_file()
    manifest = json.loads(manifest_file.read_text())
    assert manifest == read_manifest(out)
    assert manifest["step"] == "make-file"
    assert manifest["status"] == "complete"
    assert manifest["params"] == params
    assert manifest["seed"] == 3
    assert manifest["results"] == {"rows": 1}
    assert manifest["outputs"]["out"]["path"] == str(out)
    assert manifest["outputs"]["out"]["sha256"] == sha256_file(out)
    assert len(manifest["outputs"]["out"]["sha256"]) == 64
    assert manifest["inputs"] == {}
    versions = manifest["versions"]
    assert {"tamperlab", "torch", "transformers"} <= set(versions)
    assert versions["tamperlab"]  # installed (editable), so it has a version
    timing = manifest["timing"]
    assert set(timing) == {"startup_s", "phases_s", "wall_s"}
    assert set(timing["phases_s"]) == {"work"} and timing["phases_s"]["work"] >= 0
    assert timing["wall_s"] >= timing["startup_s"] >= 0
    assert manifest["started_at"].endswith("Z")
    for key in ("command", "host", "device", "cpu", "python", "git_revision"):
        assert key in manifest


def test_directory_step_manifest_lives_inside_and_hashes_every_file(tmp_path):
    out = _dir_step(tmp_path)
    manifest_file = out / MANIFEST_NAME
    assert manifest_file.is_file()
    manifest = json.loads(manifest_file.read_text())
    assert manifest["status"] == "complete"
    recorded = manifest["outputs"]["model"]["sha256"]
    assert recorded == {
        "config.json": sha256_file(out / "config.json"),
        "sub/extra.txt": sha256_file(out / "sub" / "extra.txt"),
        "weights.bin": sha256_file(out / "weights.bin"),
    }
    assert recorded == hash_output(out)


def test_step_records_its_verified_inputs_with_their_hash_and_manifest(tmp_path):
    upstream = _file_step(tmp_path)
    out = tmp_path / "e" / "y.json"
    with Step("consume", {}, inputs={"data": upstream}, outputs={"out": out}) as step:
        step.path("out").write_text("ok")
    manifest = read_manifest(out)
    assert manifest["inputs"]["data"] == {
        "path": str(upstream), "sha256": sha256_file(upstream), "manifest": str(manifest_path(upstream)),
    }


def test_an_input_inside_a_directory_output_links_to_that_directorys_manifest(tmp_path):
    """One snapshot of an attack grid (a directory inside the grid's output) is vouched for by the grid's manifest:
    the downstream manifest must name that one, not a manifest the snapshot does not have."""
    grid = _dir_step(tmp_path)
    snapshot = grid / "sub"
    out = tmp_path / "e" / "y.json"
    with Step("consume", {}, inputs={"adapter": snapshot}, outputs={"out": out}) as step:
        step.path("out").write_text("ok")
    link = read_manifest(out)["inputs"]["adapter"]["manifest"]
    assert link == str(manifest_path(grid)) and manifest_path(grid).exists()


# --- verify_input ---------------------------------------------------------------------------------------------


def test_verify_input_accepts_an_untouched_file_output_and_returns_its_manifest(tmp_path):
    out = _file_step(tmp_path)
    manifest = verify_input(out)
    assert manifest["step"] == "make-file"


def test_verify_input_accepts_an_untouched_directory_output(tmp_path):
    out = _dir_step(tmp_path)
    assert verify_input(out)["step"] == "make-dir"


def test_verify_input_accepts_both_outputs_of_a_step_sharing_a_stem(tmp_path):
    summary, responses = tmp_path / "eval" / "refusal.json", tmp_path / "eval" / "refusal.jsonl"
    with Step("evaluate", {}, inputs={}, outputs={"summary": summary, "responses": responses}) as step:
        step.path("summary").write_text("{}")
        step.path("responses").write_text("{}\n{}\n")
    assert verify_input(summary)["step"] == "evaluate"
    assert verify_input(responses)["step"] == "evaluate"


def test_verify_input_refuses_a_modified_file(tmp_path):
    out = _file_step(tmp_path)
    out.write_text('{"a": 2}\n')
    with pytest.raises(UserError, match="sha256 differs") as error:
        verify_input(out)
    assert str(out) in str(error.value)


def test_verify_input_refuses_a_truncated_file(tmp_path):
    out = _file_step(tmp_path, text="0123456789")
    out.write_text("01234")
    with pytest.raises(UserError):
        verify_input(out)


def test_verify_input_refuses_a_modified_file_inside_a_directory_and_names_it(tmp_path):
    out = _dir_step(tmp_path)
    (out / "sub" / "extra.txt").write_text("tampered")
    with pytest.raises(UserError) as error:
        verify_input(out)
    message = str(error.value)
    assert "sub/extra.txt" in message
    assert "weights.bin" not in message and "config.json" not in message


def test_verify_input_refuses_a_file_added_to_or_removed_from_a_directory(tmp_path):
    out = _dir_step(tmp_path)
    (out / "intruder.bin").write_text("x")
    with pytest.raises(UserError, match="intruder.bin"):
        verify_input(out)
    (out / "intruder.bin").unlink()
    verify_input(out)
    (out / "weights.bin").unlink()
    with pytest.raises(UserError, match="weights.bin"):
        verify_input(out)


def test_verify_input_refuses_an_output_without_manifest(tmp_path):
    out = _file_step(tmp_path)
    manifest_path(out).unlink()
    with pytest.raises(UserError, match="no manifest"):
        verify_input(out)


def test_verify_input_refuses_a_file_never_made_by_a_step(tmp_path):
    stray = tmp_path / "stray.json"
    stray.write_text("{}")
    with pytest.raises(UserError, match="no manifest"):
        verify_input(stray)


def test_verify_input_refuses_a_missing_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        verify_input(tmp_path / "nothing.json")


def test_verify_input_refuses_a_file_not_listed_in_its_manifest(tmp_path):
    out = _file_step(tmp_path, name="x.json")
    sibling = out.with_name("x.csv")  # shares x.manifest.json, but the step never wrote it
    sibling.write_text("a,b\n")
    with pytest.raises(UserError, match="not listed"):
        verify_input(sibling)


def test_verify_input_refuses_an_incomplete_status_and_an_unreadable_manifest(tmp_path):
    out = _file_step(tmp_path)
    manifest_file = manifest_path(out)
    manifest = json.loads(manifest_file.read_text())
    manifest["status"] = "running"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="'running'"):
        verify_input(out)
    manifest_file.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        verify_input(out)


def test_a_replay_of_a_missing_or_unfinished_output_is_refused_in_one_line_naming_it(tmp_path):
    from tamperlab.runtime.replay import plan

    with pytest.raises(UserError, match=r"nothing.json: output to replay does not exist$"):
        plan(tmp_path / "nothing.json")
    out = _file_step(tmp_path)
    manifest_file = manifest_path(out)
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "status": "running"}))
    with pytest.raises(UserError) as refused:
        plan(out)
    assert str(refused.value) == f"{out}: output to replay of a step whose status is 'running', not complete"


def test_downstream_step_refuses_to_start_on_a_tampered_input(tmp_path):
    upstream = _dir_step(tmp_path)
    (upstream / "weights.bin").write_text("tampered")
    out = tmp_path / "eval" / "summary.json"
    ran = []
    with pytest.raises(UserError, match="weights.bin"):
        with Step("consume", {}, inputs={"model": upstream}, outputs={"out": out}) as step:
            ran.append(True)
            step.path("out").write_text("should not happen")
    assert ran == []
    assert not out.exists()
    assert not manifest_path(out).exists()
    assert _leftovers(tmp_path) == []


def test_downstream_step_refuses_to_start_on_an_input_without_manifest(tmp_path):
    upstream = _file_step(tmp_path)
    manifest_path(upstream).unlink()
    out = tmp_path / "eval" / "summary.json"
    with pytest.raises(UserError, match="no manifest"):
        with Step("consume", {}, inputs={"data": upstream}, outputs={"out": out}):
            pass
    assert not out.exists()


def test_step_skips_verification_of_inputs_not_listed_in_verify_inputs(tmp_path):
    user_file = tmp_path / "user.txt"
    user_file.write_text("a user's own data, no manifest")
    out = tmp_path / "d" / "x.json"
    with Step("use", {}, inputs={"raw": user_file}, outputs={"out": out}, verify_inputs=()) as step:
        step.path("out").write_text("ok")
    manifest = read_manifest(out)
    assert manifest["inputs"]["raw"]["sha256"] == sha256_file(user_file)
    assert manifest["inputs"]["raw"]["manifest"] is None


# --- hash_output ------------------------------------------------------------------------------------------------


def test_hash_output_ignores_manifest_and_snakemake_timestamp(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "a.txt").write_text("a")
    before = hash_output(directory)
    (directory / MANIFEST_NAME).write_text("{}")
    (directory / ".snakemake_timestamp").write_text("")
    after = hash_output(directory)
    assert after == before == {"a.txt": sha256_file(directory / "a.txt")}


def test_hash_output_of_a_file_is_its_sha256_and_changes_with_content(tmp_path):
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256(b"abc")
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert hash_output(path) == sha256_file(path) == abc
    path.write_bytes(b"abd")
    assert hash_output(path) != abc


def test_a_manifest_names_the_cpu_kind_that_made_it():
    from tamperlab.runtime.provenance import cpu_name

    info = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert cpu_name(info) == f"AMD EPYC 9654, {os.cpu_count()} cores, AVX-512"
    assert cpu_name(info.replace(" avx512f avx512bw", "")).endswith(", AVX2")
    assert cpu_name("model name\t: Old\nflags\t: sse2\n").endswith(", no AVX2")
    assert cpu_name()  # this machine's
