"""The unlearn stage as users run it: checks before launching, crash recovery, a NaN stop."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.errors import UserError
from unlearning.unlearn import TrainingFailed, unlearn

pytestmark = pytest.mark.distributed

FINETUNE = MEMORISE


def config(out, **train):
    return validate_config(pico_raw(out, model={"finetune": FINETUNE}, method={"name": "npo"},
                                    train={"lr": 1e-3, "batch_size": 2, "num_processes": 2, **train}))


def test_problems_are_reported_before_any_rank_starts(tmp_path):
    cfg = config(tmp_path, batch_size=8, grad_accum=2, lora={"enabled": True, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(UserError) as e:
        unlearn(cfg)
    text = "\n".join(e.value.problems)
    assert "forget set has 12 examples, fewer than one global batch (8 × 2 accumulation × 2 ranks = 32)" in text
    assert "['qkv'] are not linear layers" in text and "q_proj" in text
    assert not (tmp_path / "unlearn").exists() and not (tmp_path / "models").exists()  # nothing built or run
    with pytest.raises(UserError, match=r"hostfile.*does not exist"):
        unlearn(config(tmp_path, hostfile=str(tmp_path / "nope")))


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = validate_config(pico_raw(tmp_path, model={"finetune": FINETUNE}, method={"name": "ga"},
                                   train={"lr": 1e30, "batch_size": 2, "num_processes": 2, "max_steps": 8,
                                          "checkpoint_every": 1}))
    with pytest.raises(TrainingFailed) as e:
        unlearn(cfg)
    message = str(e.value)
    assert "loss is nan" in message.lower() or "loss is inf" in message.lower() or "loss is -inf" in message.lower()
    assert "train.lr" in message
    assert "resuming with the same settings would fail the same way" in message  # not "rerun to resume"
    run = next((tmp_path / "unlearn").iterdir())
    failure = json.loads((run / "failure.json").read_text())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert failure["last_checkpoint"] == latest and (run / "checkpoints" / latest).is_dir()
    assert not (run / "run_summary.json").exists()


@pytest.mark.slow
def test_optimizer_offload_trains_and_matches_the_plain_run(tmp_path):
    """ZeRO-2 with the optimizer on the CPU uses DeepSpeed's CPU Adam (a one-time ~60 s JIT build): the
    same AdamW maths as the torch implementation, so the first loss agrees exactly and later ones closely."""
    plain = unlearn(config(tmp_path, max_steps=3))
    offload = unlearn(config(tmp_path, max_steps=3, offload="optimizer"))
    a, b = ([h["loss"] for h in r.summary["losses"]] for r in (plain, offload))
    assert a[0] == pytest.approx(b[0], rel=1e-6) and a == pytest.approx(b, rel=1e-3)


def test_a_job_past_its_time_limit_is_stopped_with_every_rank(tmp_path):
    """train.timeout_s stops the launcher's whole process group: no rank outlives the error."""
    import subprocess

    cfg = config(tmp_path, max_steps=6, timeout_s=2, checkpoint_every=3)  # the ranks take longer than 2 s to start
    with pytest.raises(TrainingFailed, match=r"ran past train.timeout_s=2 s and was stopped") as e:
        unlearn(cfg)
    # checkpoint_every is set but no checkpoint was reached: the hint says to make one come sooner
    assert "raise train.timeout_s, or lower train.checkpoint_every=3 so a checkpoint comes sooner" in str(e.value)
    spec = next((tmp_path / "unlearn").iterdir()) / "spec.json"
    left = subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout.split()
    assert left == []
    # The limit is not part of the run's identity: raising it finishes the same run directory.
    assert unlearn(config(tmp_path, max_steps=6, timeout_s=600, checkpoint_every=3)).run_dir == spec.parent
