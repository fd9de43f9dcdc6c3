"""torchrun / DDP: 2 CPU processes (gloo) reproduce 1 process for a fixed seed and global batch."""

import os
import subprocess
import sys

import pytest
import torch

from edgetl.distributed import DistInfo, env_info
from edgetl.errors import ConfigError
from edgetl.tolerances import DDP_WEIGHTS_ATOL

from .conftest import ROOT

# Dropout and batch norm on purpose: the two layers whose per-rank behaviour would differ.
RECIPE = """
name = "ddp-tiny"
[data]
server_users = [1, 2, 3]
server_val_users = [3]
device_users = [4]
[teacher]
channels = [8, 16]
kernels = [5, 3]
pools = [2, 1]
dropout = 0.2
[student]
channels = [8]
kernels = [5]
pools = [2]
dropout = 0.2
[pretrain]
epochs = 2
batch_size = 50
[student_train]
epochs = 1
batch_size = 50
"""


def _edgetl(args, procs: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(v, None)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable])
    p = subprocess.run([*launch, "-m", "edgetl.cli", *map(str, args), "-q"], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.unit
def test_env_info_reads_torchrun_variables():
    assert env_info({}) == DistInfo()
    info = env_info({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (1, 2, True, False)
    with pytest.raises(ConfigError, match="found only"):
        env_info({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK < WORLD_SIZE"):
        env_info({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


@pytest.mark.data
def test_torchrun_two_processes_match_one_process(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        log = _edgetl(["pretrain", recipe, "--out", out], procs)
        log += _edgetl(["distill", recipe, "--out", out, "--no-baseline"], procs)
        # Rank 0 alone reports and writes.
        assert log.count("teacher:") == 1 and log.count("student:") == 1, log
        assert sorted(p.name for p in out.iterdir()) == ["student.pt", "teacher.pt"]
        outs[procs] = out
    for name in ("teacher.pt", "student.pt"):
        one, two = (torch.load(outs[p] / name, weights_only=True) for p in (1, 2))
        assert one["state_dict"].keys() == two["state_dict"].keys()  # plain BN saved back
        diff = max(float((one["state_dict"][k].double() - two["state_dict"][k].double())
                         .abs().max()) for k in one["state_dict"])
        assert diff <= DDP_WEIGHTS_ATOL, (name, diff)
        assert one["meta"]["heldout_accuracy"] == pytest.approx(two["meta"]["heldout_accuracy"],
                                                                abs=1e-3)
