"""Fault-injection corpus, processes: ranks killed mid-checkpoint, `unlearn` killed with SIGKILL or stopped by
Ctrl-C, two runs of one config at once, a rank that crashes natively after its job finished, a diverging or
destroyed model, a job past its time limit. Real ranks, a real flow; every signal is
sent by the test (or by a rank to itself at a chosen point, through the UNLEARN_FAULT_* variables)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.models import load_causal_lm
from unlearning.train.complete import complete_tags, is_complete
from unlearning.train.job import EXIT_ENV, KILL_ENV
from unlearning.unlearn import TrainingFailed, unlearn, unlearn_many

pytestmark = pytest.mark.distributed
UNLEARN = Path(sys.executable).parent / "unlearn"


def _raw(out: Path, method: str = "npo", **train):
    return pico_raw(out, model={"finetune": MEMORISE}, method={"name": method},
                    train={"lr": 1e-3, "batch_size": 2, "num_processes": 2, **train})


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_causal_lm(a).state_dict(), load_causal_lm(b).state_dict()
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def _ranks_of(run_dir: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", str(run_dir / "spec.json")], capture_output=True, text=True).stdout.split()


def _started_until_a_checkpoint(tmp_path: Path, command: str) -> tuple[subprocess.Popen, Path]:
    """`unlearn COMMAND cfg.yaml` started from tmp_path (output in first.log) and left running until its job has
    a complete checkpoint, mid-training; the process and the job's run directory."""
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([str(UNLEARN), command, str(tmp_path / "cfg.yaml")], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list((tmp_path / "run" / "unlearn").glob("*/checkpoints"))
        if ckpts and complete_tags(ckpts[0]):
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    assert _ranks_of(ckpts[0].parent)  # training, mid-run
    return proc, ckpts[0].parent


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _assert_ranks_end(run_dir: Path, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while _ranks_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ranks_of(run_dir) == []


def test_a_rank_killed_as_a_checkpoint_begins_leaves_it_invisible_and_the_rerun_resumes_from_the_last_complete(
        tmp_path, monkeypatch, capfd):
    """Rank 1 SIGKILLs itself as step 4's checkpoint begins, in a launch that holds a GA job first: GA finishes,
    rank 0 may write its shards of step4 but rank 1's never come. The ranks are started once more (no error said
    what to change), resume from step2 and die again at step 4: the command fails, naming step2, with `latest`
    still at step2. The rerun resumes there and ends bit-identical to never stopping; only NPO runs again."""
    whole = unlearn(validate_config(_raw(tmp_path / "a", max_steps=6, checkpoint_every=2)))
    jobs = {"ga": validate_config(_raw(tmp_path / "b", "ga", max_steps=3)),
            "npo": validate_config(_raw(tmp_path / "b", max_steps=6, checkpoint_every=2))}
    monkeypatch.setenv(KILL_ENV, "1:4")
    with pytest.raises(TrainingFailed, match=r"last complete checkpoint is step2"):
        unlearn_many(jobs)
    assert "starting them again for the 1 unfinished job(s)" in capfd.readouterr().err
    runs = {p.name.split("-")[0]: p for p in (tmp_path / "b" / "unlearn").iterdir()}
    assert (runs["ga"] / "run_summary.json").is_file() and not (runs["npo"] / "run_summary.json").exists()
    ckpts = runs["npo"] / "checkpoints"
    assert complete_tags(ckpts) == ["step2"] and (ckpts / "latest").read_text().strip() == "step2"
    assert not (ckpts / "step4").exists() or not is_complete(ckpts / "step4")
    monkeypatch.delenv(KILL_ENV)
    done = unlearn_many(jobs)
    resumed = done["npo"]
    assert done["ga"].cached and not resumed.cached
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 6
    assert [h["loss"] for h in resumed.summary["losses"]] == [h["loss"] for h in whole.summary["losses"]]
    _same_weights(whole.model, resumed.model)
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step4", "step6"]  # keep_checkpoints=2
    assert not (runs["npo"] / "failure.json").exists()  # the earlier attempts' reason is gone with the finished run


def test_a_rank_that_crashes_after_its_job_finished_does_not_fail_the_launch(tmp_path, monkeypatch, capfd):
    """Rank 1 aborts (a native crash, as `terminate called without an active exception`) after each job's summary:
    the finished job counts as finished, and the ranks are started once more for the job they never reached."""
    jobs = {"ga": validate_config(_raw(tmp_path, "ga", max_steps=3)),
            "npo": validate_config(_raw(tmp_path, "npo", max_steps=3))}
    monkeypatch.setenv(EXIT_ENV, "1")
    done = unlearn_many(jobs)
    assert all((r.run_dir / "run_summary.json").is_file() for r in done.values())
    assert "starting them again for the 1 unfinished job(s)" in capfd.readouterr().err


def test_two_runs_of_one_config_at_once_both_succeed_and_build_each_output_once(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_raw(tmp_path / "run", max_steps=4)))
    procs = [subprocess.Popen([str(UNLEARN), "unlearn", str(tmp_path / "cfg.yaml")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert any("waiting for another process" in err for _, err in outs)  # one waited for the other
    run = tmp_path / "run"
    assert not [p for p in run.rglob(".*tmp*")]  # no half-published output left behind
    assert len(list((run / "models").glob("target-*"))) == 1 and len(list((run / "unlearn").iterdir())) == 1
    assert len(list((run / "models").glob("*/build.json"))) == 2  # the target and the oracle
    assert sum(err.count("training npo on 2 rank(s)") for _, err in outs) == 1  # trained once; the other waited


def test_sigkill_of_unlearn_run_stops_its_ranks_and_the_same_command_ends_with_the_uninterrupted_weights(tmp_path):
    raw = _raw(tmp_path / "run", max_steps=60, checkpoint_every=5)
    raw["eval"] = {"suite": "quick", "models": ["unlearned"]}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "register_models": False}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    first, run_dir = _started_until_a_checkpoint(tmp_path, "run")
    server = subprocess.run(["pgrep", "-P", str(first.pid), "-f", "prefect.server.api.server:create_app"],
                            capture_output=True, text=True).stdout.split()
    assert len(server) == 1  # unlearn's own temporary Prefect server (flows.server)
    os.kill(first.pid, signal.SIGKILL)  # what `kill -9 <pid of unlearn run>` does
    first.wait()
    _assert_ranks_end(run_dir)  # the launcher and both ranks died with it
    deadline = time.monotonic() + 10
    while _alive(int(server[0])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(int(server[0]))  # and so did the Prefect server
    assert not (run_dir / "run_summary.json").exists()

    again = subprocess.run([str(UNLEARN), "run", str(tmp_path / "cfg.yaml")], cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 60 and summary["steps"] == 60
    whole = unlearn(validate_config(_raw(tmp_path / "whole", max_steps=60, checkpoint_every=5)))
    _same_weights(whole.model, run_dir / "model")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed run's runs were ended on the rerun
    assert any(r.info.status == "KILLED" for r in runs)


def test_ctrl_c_of_unlearn_stops_its_ranks_and_says_so_in_one_line(tmp_path):
    """SIGINT (Ctrl-C) mid-training: exit status 130, one line saying what is kept, no traceback, no rank left."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_raw(tmp_path / "run", max_steps=400, checkpoint_every=5)))
    proc, run_dir = _started_until_a_checkpoint(tmp_path, "unlearn")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    _assert_ranks_end(run_dir)
    output = (tmp_path / "first.log").read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("interrupted: finished stages and complete checkpoints are kept")
    assert complete_tags(run_dir / "checkpoints") and not (run_dir / "run_summary.json").exists()


def test_a_destroyed_model_fails_unlearn_run_once_with_one_error_that_says_what_to_change(tmp_path):
    """lr=1e3: gradient ascent wrecks the retain set within 5 steps and train.stop.collapse fails the run. The
    error says so and that resuming cannot help; the ranks are not started again (the error says what to change);
    Prefect's copies of the error (an ERROR line and a traceback per task and flow) are filtered: one `error:` line."""
    raw = _raw(tmp_path / "run", "ga", lr=1e3, max_steps=40)
    raw["eval"] = {"suite": "quick", "models": ["unlearned"]}
    raw["tracking"] = {"uri": "none"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    res = subprocess.run([str(UNLEARN), "run", str(tmp_path / "cfg.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ERROR" not in res.stderr, res.stderr[-3000:]
    assert "starting them again" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "below train.stop.collapse=0.01 of its start: the model is destroyed" in errors[0]
    assert "resuming with the same settings would fail the same way" in errors[0]
    assert not list((tmp_path / "run" / "unlearn").glob("*/run_summary.json"))


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = validate_config(_raw(tmp_path, "ga", lr=1e30, max_steps=8, checkpoint_every=1))
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


def test_a_job_past_its_time_limit_is_stopped_with_every_rank(tmp_path):
    """train.timeout_s stops the launcher's whole process group: no rank outlives the error."""
    cfg = validate_config(_raw(tmp_path, max_steps=6, timeout_s=2, checkpoint_every=3))  # ranks take > 2 s to start
    with pytest.raises(TrainingFailed, match=r"ran past train.timeout_s=2 s and was stopped") as e:
        unlearn(cfg)
    # checkpoint_every is set but no checkpoint was reached: the hint says to make one come sooner
    assert "raise train.timeout_s, or lower train.checkpoint_every=3 so a checkpoint comes sooner" in str(e.value)
    spec = next((tmp_path / "unlearn").iterdir()) / "spec.json"
    assert _ranks_of(spec.parent) == []
    # The limit is not part of the run's identity: raising it finishes the same run directory.
    again = unlearn(validate_config(_raw(tmp_path, max_steps=6, timeout_s=600, checkpoint_every=3)))
    assert again.run_dir == spec.parent
