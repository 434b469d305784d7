"""Training ranks never outlive the `unlearn` process that launched them, and one run directory has one job.

- The launcher (torchrun or deepspeed) is started with the kernel's parent-death signal set
  (`orphan_proof`, Linux `prctl(PR_SET_PDEATHSIG)`): if `unlearn` is killed, even by SIGKILL, the launcher
  gets SIGKILL.
- Every rank runs a watchdog (`watch_parent`): once the launching `unlearn` process (its pid passed in the
  environment, `parent_env`) is gone, or the rank's own parent changed (its launcher died), the rank kills
  itself. A rank on another node cannot see the pid and relies on its launcher's rendezvous instead.
- While ranks run jobs, each holds a shared lock on every job's `.ranks.lock`; the launching process holds
  an exclusive `.launch.lock` for the whole launch, and checks that no rank of an earlier launch still holds
  `.ranks.lock` before starting (`run_dir_locks`). A second `unlearn` on the same run directory therefore
  waits for the first (and then finds the job finished) instead of training into the same checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from unlearning.outputs import locked

PARENT_PID = "UNLEARNING_PARENT_PID"
PARENT_HOST = "UNLEARNING_PARENT_HOST"
PR_SET_PDEATHSIG = 1


def parent_env() -> dict[str, str]:
    """The environment entries that tell ranks which process launched them."""
    return {PARENT_PID: str(os.getpid()), PARENT_HOST: socket.gethostname()}


def orphan_proof(argv: list[str]) -> list[str]:
    """`argv` started through this module, which asks the kernel to SIGKILL it when its parent (this `unlearn`)
    dies and then becomes it (`exec`: the setting survives it). Not a `preexec_fn`, which is unsafe in a
    process with threads (Prefect's task runners)."""
    return [sys.executable, "-m", "unlearning.train.lifetime", str(os.getpid()), *argv]


def _exec_orphan_proof(parent: int, argv: list[str]) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the setting took effect
        sys.exit(1)
    os.execvp(argv[0], argv)


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(interval_s: float = 0.5) -> None:
    """Start this rank's watchdog thread (see the module docstring); a no-op when not launched by `unlearn` or
    on another node."""
    pid = int(os.environ.get(PARENT_PID, "0") or 0)
    same_host = os.environ.get(PARENT_HOST) == socket.gethostname()
    launcher = os.getppid()

    def watch() -> None:
        while True:
            if (same_host and pid and not alive(pid)) or os.getppid() != launcher:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval_s)

    if pid:
        threading.Thread(target=watch, name="unlearn-watchdog", daemon=True).start()


@contextlib.contextmanager
def ranks_hold(run_dirs: Sequence[Path]) -> Iterator[None]:
    """In a rank: a shared lock on each job's `.ranks.lock` while the jobs run."""
    with contextlib.ExitStack() as stack:
        for run_dir in run_dirs:
            stack.enter_context(locked(run_dir / ".ranks.lock", "", shared=True))
        yield


@contextlib.contextmanager
def run_dir_locks(run_dirs: Sequence[Path]) -> Iterator[None]:
    """In the launching process: the run directories' launch locks (sorted, so two launches of overlapping jobs
    cannot deadlock), and no rank of an earlier launch still running in any of them."""
    with contextlib.ExitStack() as stack:
        for run_dir in sorted(set(run_dirs)):
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(run_dir / ".launch.lock", f"is training in {run_dir}"))
            with locked(run_dir / ".ranks.lock", f"has ranks still running in {run_dir}"):
                pass
        yield


if __name__ == "__main__":
    _exec_orphan_proof(int(sys.argv[1]), sys.argv[2:])
