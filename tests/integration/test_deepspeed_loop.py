"""The one training loop over real DeepSpeed engines: 2 gloo ranks on CPU, ZeRO-2 and ZeRO-3."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from unlearning.train.launch import launch_argv

pytestmark = pytest.mark.distributed


def run_ranks(out: Path, stage: int, port: int) -> list[dict]:
    argv = launch_argv(launcher="torchrun", num_processes=2, num_nodes=1, module="tests.integration.ds_rank",
                       args=[str(out), str(stage)], master_port=port)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / f"losses-{stage}.json").read_text())


def test_zero2_and_zero3_take_the_same_first_steps(tmp_path):
    """Same data, same init: ZeRO-3's partitioned parameters must not change the maths.
    Tolerance 1e-5: fp32 reduction order differs between the stages' gradient partitioning."""
    z2 = run_ranks(tmp_path, 2, 29611)
    z3 = run_ranks(tmp_path, 3, 29612)
    assert len(z2) == len(z3) == 5
    for a, b in zip(z2, z3, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
    assert z2[-1]["loss"] < z2[0]["loss"]  # it trains
    assert z2[0]["lr"] < z2[1]["lr"]  # warm-up: the first step uses the smallest rate
