import sys

import pytest

from unlearning.config import validate_config
from unlearning.errors import UserError
from unlearning.schema import TrainConfig
from unlearning.train.engine import deepspeed_config
from unlearning.train.launch import launch_argv, read_hostfile


def test_global_batch_is_micro_times_accumulation_times_world():
    ds = deepspeed_config(TrainConfig(batch_size=4, grad_accum=3), world_size=2)
    assert ds["train_batch_size"] == 24
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3


def test_offload_settings_offload_what_they_say():
    none = deepspeed_config(TrainConfig(), 1)["zero_optimization"]
    assert "offload_optimizer" not in none and "offload_param" not in none
    opt = deepspeed_config(TrainConfig(offload="optimizer"), 1)
    assert opt["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert opt["optimizer"]["params"]["torch_adam"] is False
    full = deepspeed_config(TrainConfig(zero_stage=3, offload="all"), 1)["zero_optimization"]
    assert full["offload_param"]["device"] == "cpu" and full["stage3_gather_16bit_weights_on_model_save"]



@pytest.mark.parametrize(("stage", "offload", "message"), [
    (2, "all", "only ZeRO-3 partitions"), (0, "optimizer", "offload needs ZeRO")])
def test_offload_that_would_offload_nothing_is_rejected_at_validation(stage, offload, message):
    with pytest.raises(UserError, match=message):
        validate_config({"name": "x", "train": {"zero_stage": stage, "offload": offload}})
    assert validate_config({"name": "x", "train": {"zero_stage": 3, "offload": "all"}}).train.offload == "all"


def test_torchrun_argv_is_a_list_for_one_node():
    argv = launch_argv(launcher="torchrun", num_processes=2, num_nodes=1, module="unlearning.train",
                       args=["--spec", "s.json"], master_port=29555)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in argv and "--master-port=29555" in argv
    assert argv[-4:] == ["-m", "unlearning.train", "--spec", "s.json"]


def test_deepspeed_launcher_needs_rank_count_on_cpu_and_takes_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slots=1\n")
    assert read_hostfile(hostfile) == [("node-a", 1), ("node-b", 1)]
    argv = launch_argv(launcher="deepspeed", num_processes=1, num_nodes=2, module="unlearning.train",
                       args=[], hostfile=str(hostfile))
    assert f"--hostfile={hostfile}" in argv and "--num_nodes=2" in argv and "--num_gpus=1" in argv
    assert argv[argv.index("--module") + 1] == "unlearning.train"


@pytest.mark.parametrize("text", ["node-a\n", "node-a slots=x\n", "node-a gpus=2\n", "# nothing\n"])
def test_bad_hostfile_lines_are_reported(tmp_path, text):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    with pytest.raises(UserError):
        read_hostfile(hostfile)
