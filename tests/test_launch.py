"""The launcher by size class and the ZeRO-3 config (pure functions, no torch), and the tests' own launch helper
against a real torchrun."""

from __future__ import annotations

import json
import shlex

import pytest

from tamperlab.errors import UserError
from tamperlab.runtime import launch

ZERO3 = "accelerate launch --num_processes {n} --num_machines 1 --main_process_port 0 --use_deepspeed " \
        "--deepspeed_config_file {c} -m tamperlab.cli"


@pytest.mark.parametrize(("size", "zero3", "gpus", "expected"), [
    ("tiny", None, 0, "tamperlab"),
    ("tiny", False, 1, "tamperlab"),
    ("tiny", True, 2, ZERO3.format(n=2, c="z.json")),  # what CI runs: the organism on 2 CPU processes
    ("7b", None, 0, "tamperlab"),
    ("7b", True, 0, ZERO3.format(n=1, c="z.json")),  # one GPU, sharded only by config (offload)
    ("13b", None, 0, ZERO3.format(n=2, c="z.json")),
    ("13b", None, 4, ZERO3.format(n=4, c="z.json")),
    ("13b", False, 1, "tamperlab"),
    ("70b", None, 0, ZERO3.format(n=8, c="z.json")),
    ("70b", True, 16, ZERO3.format(n=16, c="z.json")),
])
def test_the_size_class_picks_the_launcher_and_the_process_count(size, zero3, gpus, expected):
    assert launch.launcher(size, zero3, gpus, "z.json") == expected
    flags = launch.zero3_arguments(size, zero3, "z.json")
    assert flags == ("--deepspeed z.json" if expected != "tamperlab" else "")


def test_the_table_in_the_docstring_is_the_table_in_the_code():
    for size, spec in launch.SIZE_CLASSES.items():
        row = next(line.split() for line in launch.__doc__.splitlines() if line.split()[:1] == [size])
        assert int(row[1]) == spec.processes
        assert row[3 if row[2] == "(CPU)" else 2].rstrip(";") == ("always" if spec.zero3_required else
                                                                  "on" if spec.zero3 else "off")


@pytest.mark.parametrize(("size", "zero3", "gpus", "message"), [
    ("70b", False, 0, "size 70b: trains under DeepSpeed ZeRO-3 only (zero3: false is not possible)"),
    ("3b", None, 0, "size '3b': expected one of tiny, 7b, 13b, 70b"),
    ("tiny", None, 2, "size tiny: 2 processes need ZeRO-3 (zero3: true); without it one process trains"),
    ("13b", False, 2, "size 13b: 2 processes need ZeRO-3 (zero3: true); without it one process trains"),
    ("tiny", True, -1, "size tiny: gpus must be ≥ 1, got -1"),
])
def test_a_launch_that_cannot_work_is_one_error_naming_the_size(size, zero3, gpus, message):
    with pytest.raises(UserError) as error:
        launch.launcher(size, zero3, gpus, "z.json")
    assert str(error.value) == message


def test_zero3_needs_a_config_file():
    with pytest.raises(UserError, match="size 13b: ZeRO-3 needs a DeepSpeed config file"):
        launch.launcher("13b", None, 0, None)
    with pytest.raises(UserError, match="size 70b: ZeRO-3 needs a DeepSpeed config file"):
        launch.zero3_arguments("70b", None, "")
    assert launch.launcher("tiny", None, 0, None) == "tamperlab"  # a plain launch needs none


def test_a_config_path_with_spaces_stays_one_argument():
    path = "/data/my runs/zero3.json"
    command = shlex.split(launch.launcher("13b", None, 0, path))
    assert command[command.index("--deepspeed_config_file") + 1] == path
    assert shlex.split(launch.zero3_arguments("13b", None, path)) == ["--deepspeed", path]


def test_the_packaged_config_leaves_the_trainer_its_values_and_saves_whole_weights():
    config = launch.zero3_config()
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # The Trainer fills these from its own arguments, so one config serves every size and batch.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"] == {"enabled": "auto"} and config["fp16"] == {"enabled": "auto"}
    # The Trainer's torch AdamW and scheduler, not DeepSpeed's (whose fused ops compile on first use).
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True


def test_overrides_merge_key_by_key_and_the_written_file_reads_back(tmp_path):
    overrides = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "gradient_clipping": 0.5}
    path = launch.write_zero3_config(tmp_path / "cfg" / "zero3.json", overrides)
    config = launch.read_zero3_config(path)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["stage"] == 3  # the rest of the section is kept
    assert config["gradient_clipping"] == 0.5
    again = launch.write_zero3_config(tmp_path / "again.json", overrides)
    assert again.read_bytes() == path.read_bytes()  # the same config, the same bytes (sorted keys)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage must be 3"),
    ({"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": False}},
     "zero_optimization.stage3_gather_16bit_weights_on_model_save must be true"),
])
def test_a_config_that_would_save_shards_is_refused(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        launch.zero3_config(overrides)
    path, config = tmp_path / "bad.json", json.loads(launch.ZERO3_CONFIG.read_text())
    config["zero_optimization"].update(overrides["zero_optimization"])  # the default with the override in it
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"{path}: {message}"):
        launch.read_zero3_config(path)


def test_an_unreadable_config_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.json: DeepSpeed config does not exist"):
        launch.read_zero3_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{stage: 3")
    with pytest.raises(UserError, match="broken.json: DeepSpeed config is not valid JSON"):
        launch.read_zero3_config(tmp_path / "broken.json")


def test_only_rank_zero_writes(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (launch.rank(), launch.world_size(), launch.is_writer()) == (0, 1, True)  # a plain process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (launch.rank(), launch.world_size(), launch.is_writer()) == (1, 2, False)


def test_the_launch_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tamperlab.runtime.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


ABORTS_ONCE = """
import os, pathlib, torch.distributed as dist
dist.init_process_group("gloo")
marker = pathlib.Path("aborted")
if dist.get_rank() == 1 and not marker.exists():
    marker.touch()
    os.abort()
dist.barrier()
print(f"rank {dist.get_rank()} done", flush=True)
"""
RAISES = """
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    raise ValueError("no such model")
dist.barrier()
"""


def test_a_rank_killed_by_a_signal_is_launched_again_once_and_a_python_error_is_not(tmp_path):
    """tests/conftest.py `launch` against torch.distributed.elastic's real report: a rank that aborts (once) is
    rerun with a warning that carries its faulthandler stack; a rank that raises fails at once, its error shown."""
    import os
    import sys

    from helpers import launch as run_launch

    (tmp_path / "aborts.py").write_text(ABORTS_ONCE)
    (tmp_path / "raises.py").write_text(RAISES)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with pytest.warns(UserWarning, match=r"(?s)rank 1 died by SIGABRT; launched again.*Fatal Python error: Abort"):
        output = run_launch([*torchrun, "aborts.py"], env, tmp_path, timeout=120)
    assert "rank 0 done" in output and "rank 1 done" in output
    with pytest.raises(AssertionError, match="(?s)launch failed.*no such model"):
        run_launch([*torchrun, "raises.py"], env, tmp_path, timeout=120)
