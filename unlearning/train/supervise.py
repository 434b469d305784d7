"""Start the ranks of unlearning jobs and watch them: one start for several jobs, a retry after a crash
that says nothing, a time limit, and no rank that outlives the launching process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from unlearning.errors import UserError
from unlearning.schema import ExperimentConfig
from unlearning.train.complete import latest_complete
from unlearning.train.launch import free_port, launch_argv, on_gpu, read_hostfile
from unlearning.train.lifetime import orphan_proof, parent_env, run_dir_locks


class TrainingFailed(UserError):
    """The training job exited with an error; the message carries its reason and the log's tail."""


def world_size(cfg: ExperimentConfig) -> int:
    train = cfg.train
    if train.hostfile and Path(train.hostfile).is_file():
        return sum(slots for _, slots in read_hostfile(train.hostfile)[: train.num_nodes])
    return train.num_processes * train.num_nodes


def _job_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.train.num_processes)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _failure_message(run_dir: Path, log: Path, returncode: int) -> str:
    failure = run_dir / "failure.json"
    resume = _resume_hint(run_dir)
    if failure.is_file():
        record = json.loads(failure.read_text())
        if not record.get("resumable", True):
            resume = ("resuming with the same settings would fail the same way; a changed setting starts a new run "
                      "from the start")
        return f"training stopped: {record['error']} ({resume}; log: {log})"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
    return f"the training job exited with status {returncode} ({resume}); the end of {log}:\n{tail}"


def launch_group(cfg: ExperimentConfig) -> tuple[Any, ...]:
    """What a run's launch looks like: runs that agree on it can share one start of the ranks. A run with its
    own time limit starts alone, so that the limit is its own."""
    train = cfg.train
    alone = None if train.timeout_s is None else id(cfg)
    return (train.launcher, train.num_processes, train.num_nodes, train.hostfile, alone)


def launch(cfg: ExperimentConfig, jobs: list[tuple[dict[str, Any], Path]]) -> None:
    """Start the ranks once for `jobs` (spec, run directory), which run one after another in those ranks, and
    wait; raise `TrainingFailed` with the reason if any fails (the ones before it stay finished).

    `cfg` gives the launch (launcher, ranks, nodes, time limit), the same for every job (`launch_group`). Each
    rank writes a job's output to that job's train.log; a launch of several jobs writes the launcher's own
    lines to launch.log beside the first. A job is finished when its run_summary.json exists, whatever the
    exit status; the run directories are locked for the launch (`run_dir_locks`): a concurrent `unlearn` on
    the same jobs waits, then finds them finished. Ranks that fail without an expected error (a native crash
    at exit, a rank killed, a lost connection) are started once more for the unfinished jobs, which resume
    from their last complete checkpoints.
    """
    # One launching process per job: node 0's (the others of a multi-node launch join the same jobs).
    first_node = int(os.environ.get("NODE_RANK", "0")) == 0
    with run_dir_locks([run_dir for _, run_dir in jobs]) if first_node else contextlib.nullcontext():
        for attempt in (1, 2):
            todo = [(spec, run_dir) for spec, run_dir in jobs if not (run_dir / "run_summary.json").is_file()]
            if not todo:
                return
            returncode = _launch_once(cfg, todo)
            unfinished = [run_dir for _, run_dir in todo if not (run_dir / "run_summary.json").is_file()]
            if not unfinished:
                return
            if returncode is None:
                raise TrainingFailed(_timeout_message(cfg, unfinished[0], unfinished[0] / "train.log"))
            if attempt == 1 and not _expected_failure(unfinished[0]):
                print(f"the ranks exited with status {returncode} without an error that says what to change; "
                      f"starting them again for the {len(unfinished)} unfinished job(s), which resume from their "
                      "last complete checkpoint", file=sys.stderr, flush=True)
                continue
            raise TrainingFailed(_failure_message(unfinished[0], unfinished[0] / "train.log", returncode or 0))


def _expected_failure(run_dir: Path) -> bool:
    """Whether a job failed in a way a rerun as it is cannot mend (its failure.json says what to change)."""
    try:
        return bool(json.loads((run_dir / "failure.json").read_text()).get("expected"))
    except (OSError, ValueError):
        return False


def _launch_once(cfg: ExperimentConfig, jobs: list[tuple[dict[str, Any], Path]]) -> int | None:
    """One start of the ranks for `jobs`; the launcher's exit status, or None past train.timeout_s."""
    for spec, run_dir in jobs:
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        (run_dir / "failure.json").unlink(missing_ok=True)
    train = cfg.train
    master_addr = os.environ.get("MASTER_ADDR") or (read_hostfile(train.hostfile)[0][0] if train.hostfile
                                                    else "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or (29500 if train.num_nodes > 1 else free_port()))
    node_rank = int(os.environ.get("NODE_RANK", "0"))
    # With a hostfile, this node starts as many ranks as its line has slots (torchrun runs per node).
    per_node = (read_hostfile(train.hostfile)[node_rank][1] if train.hostfile and train.launcher == "torchrun"
                else train.num_processes)
    argv = launch_argv(launcher=train.launcher, num_processes=per_node, num_nodes=train.num_nodes,
                       module="unlearning.train", args=[str(run_dir / "spec.json") for _, run_dir in jobs],
                       hostfile=train.hostfile, master_addr=master_addr, master_port=port, node_rank=node_rank,
                       on_cpu=not on_gpu())
    log = jobs[0][1] / ("train.log" if len(jobs) == 1 else "launch.log")
    names = ", ".join(spec["config"]["method"]["name"] + (" (LoRA)" if spec["config"]["train"]["lora"]["enabled"]
                                                          else "") for spec, _ in jobs)
    print(f"training {names} on {world_size(cfg)} rank(s); log: {jobs[0][1] / 'train.log'}"
          + (f" and {len(jobs) - 1} more" if len(jobs) > 1 else ""), file=sys.stderr, flush=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        return _run_job(argv, out, _job_env(cfg), train.timeout_s)


def _resume_hint(run_dir: Path) -> str:
    tag = latest_complete(run_dir / "checkpoints")
    return (f"the last complete checkpoint is {tag} in {run_dir / 'checkpoints'}; rerun the same command to resume "
            "from it" if tag else "no complete checkpoint was written")


def _timeout_message(cfg: ExperimentConfig, run_dir: Path, log: Path) -> str:
    every = cfg.train.checkpoint_every
    fix = ("raise train.timeout_s" if every and latest_complete(run_dir / "checkpoints") else
           f"raise train.timeout_s, or lower train.checkpoint_every={every} so a checkpoint comes sooner" if every
           else "raise train.timeout_s or set train.checkpoint_every")
    return (f"the training job ran past train.timeout_s={cfg.train.timeout_s:g} s and was stopped "
            f"({_resume_hint(run_dir)}; {fix}; log: {log})")


def _run_job(argv: list[str], out: Any, env: dict[str, str], timeout_s: float | None) -> int | None:
    """Run the launcher in its own process group; its exit status, or None past `timeout_s`.

    However this returns (timeout, Ctrl-C, an orchestrator's cancellation), no rank outlives it: the whole
    group gets SIGTERM, then SIGKILL after a grace period. And if this process dies without returning (SIGKILL,
    OOM killer), the launcher gets SIGKILL from the kernel and every rank stops within a second
    (`unlearning.train.lifetime`).
    """
    proc = subprocess.Popen(orphan_proof(argv), stdout=out, stderr=subprocess.STDOUT, env={**env, **parent_env()},
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
