"""Multi-node training as far as one machine allows: two "nodes" (two launcher process groups, each its
own `unlearn unlearn` with NODE_RANK 0 and 1) rendezvous over 127.0.0.1 and train one gloo job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.train.launch import free_port, launch_argv, read_hostfile

pytestmark = pytest.mark.distributed


def test_torchrun_argv_per_node_comes_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1  # master\nnode-b slots=1\n")
    assert read_hostfile(hostfile) == [("node-a", 1), ("node-b", 1)]
    argv = launch_argv(launcher="torchrun", num_processes=1, num_nodes=2, module="unlearning.train",
                       args=["spec.json"], hostfile=str(hostfile), master_addr="node-a", master_port=29511,
                       node_rank=1)
    assert argv[1:] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--node-rank=1",
                        "--master-addr=node-a", "--master-port=29511", "-m", "unlearning.train", "spec.json"]


def test_two_nodes_of_one_rank_train_one_job(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.1 slots=1\n")
    raw = pico_raw(tmp_path / "run", model={"finetune": MEMORISE}, method={"name": "npo"},
                   train={"lr": 1e-3, "batch_size": 2, "max_steps": 3, "num_processes": 1, "num_nodes": 2,
                          "hostfile": str(hostfile)})
    config = tmp_path / "two-nodes.yaml"
    config.write_text(yaml.safe_dump(raw))
    unlearn = [sys.executable, "-m", "unlearning.cli"]
    # The shared filesystem holds the data and target before the nodes start (as on a cluster).
    subprocess.run([*unlearn, "build-models", str(config)], check=True, capture_output=True)
    port = str(free_port())
    nodes = [subprocess.Popen([*unlearn, "unlearn", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "NODE_RANK": str(rank), "MASTER_PORT": port})
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    cfg = validate_config(raw)
    run = next((cfg.out / "unlearn").iterdir())
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert "--nnodes=2" in (run / "train.log").read_text()


def test_a_node_rank_outside_the_job_is_refused_before_launch(tmp_path, monkeypatch):
    from unlearning.unlearn import launch_problems

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\n")
    cfg = validate_config(pico_raw(tmp_path, train={"num_nodes": 2, "hostfile": str(hostfile)}))
    monkeypatch.setenv("NODE_RANK", "2")
    text = "\n".join(launch_problems(cfg))
    assert "lists 1 node(s), fewer than train.num_nodes=2" in text and "NODE_RANK=2 is not a node" in text

