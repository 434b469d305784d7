"""The unlearn stage as users run it: checks before launching, crash recovery, a NaN stop."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.errors import UserError
from unlearning.models import load_causal_lm
from unlearning.train.job import FAULT_ENV
from unlearning.unlearn import TrainingFailed, unlearn, unlearn_many

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


def test_a_crashed_run_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Checkpoints every 2 steps; the crash comes after step 4's checkpoint. The rerun restores weights,
    AdamW moments and the schedule, and the sampler jumps to step 5: bit-identical to never stopping.

    The crashed launch held a GA run too (one start of the ranks for both, each job writing its own train.log):
    GA, run first and never reaching step 4, finished; the rerun starts only the NPO job."""
    whole = unlearn(config(tmp_path / "a", max_steps=6, checkpoint_every=2))
    jobs = {"ga": validate_config(pico_raw(tmp_path / "b", model={"finetune": FINETUNE}, method={"name": "ga"},
                                           train={"lr": 1e-3, "batch_size": 2, "num_processes": 2, "max_steps": 3})),
            "npo": config(tmp_path / "b", max_steps=6, checkpoint_every=2)}
    monkeypatch.setenv(FAULT_ENV, "4")
    with pytest.raises(TrainingFailed) as e:
        unlearn_many(jobs)
    message = str(e.value)
    assert "fault injected after step 4" in message and "step4" in message and "rerun" in message
    runs = {p.name.split("-")[0]: p for p in (tmp_path / "b" / "unlearn").iterdir()}
    assert (runs["ga"] / "run_summary.json").is_file() and not (runs["npo"] / "run_summary.json").exists()
    launches = [line for line in (runs["ga"] / "launch.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(launches) == 1 and launches[0].endswith(f"{runs['ga'] / 'spec.json'} {runs['npo'] / 'spec.json'}")
    assert "unlearn ga: step 3/3" in (runs["ga"] / "train.log").read_text()
    assert "unlearn npo" not in (runs["ga"] / "train.log").read_text()
    monkeypatch.delenv(FAULT_ENV)
    done = unlearn_many(jobs)
    resumed = done["npo"]
    assert done["ga"].cached and not resumed.cached
    assert resumed.summary["resumed_from_step"] == 4 and resumed.summary["steps"] == 6
    assert [h["loss"] for h in resumed.summary["losses"]] == [h["loss"] for h in whole.summary["losses"]]
    a, b = load_causal_lm(whole.model).state_dict(), load_causal_lm(resumed.model).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert unlearn(config(tmp_path / "b", max_steps=6, checkpoint_every=2)).cached


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = validate_config(pico_raw(tmp_path, model={"finetune": FINETUNE}, method={"name": "ga"},
                                   train={"lr": 1e30, "batch_size": 2, "num_processes": 2, "max_steps": 8,
                                          "checkpoint_every": 1}))
    with pytest.raises(TrainingFailed) as e:
        unlearn(cfg)
    message = str(e.value)
    assert "loss is nan" in message.lower() or "loss is inf" in message.lower() or "loss is -inf" in message.lower()
    assert "train.lr" in message
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

    cfg = config(tmp_path, max_steps=6, timeout_s=2)  # the ranks alone take longer than 2 s to start
    with pytest.raises(TrainingFailed, match=r"ran past train.timeout_s=2 s and was stopped"):
        unlearn(cfg)
    spec = next((tmp_path / "unlearn").iterdir()) / "spec.json"
    left = subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout.split()
    assert left == []
    # The limit is not part of the run's identity: raising it finishes the same run directory.
    assert unlearn(config(tmp_path, max_steps=6, timeout_s=600)).run_dir == spec.parent
