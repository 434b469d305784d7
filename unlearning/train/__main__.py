"""Entry point of the ranks: `python -m unlearning.train SPEC.json [SPEC.json ...]` (started by torchrun or
deepspeed). The jobs run one after another in the same ranks, each writing its output to its own train.log;
a finished job (its run_summary.json exists) is skipped, and the first job that fails ends the launch, so a
rerun of the same launch continues with it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from unlearning.train.job import EXIT_ENV, FAILED_EXIT, JobError, record_failure, run
from unlearning.train.lifetime import ranks_hold, watch_parent
from unlearning.train.loop import NonFiniteLoss
from unlearning.train.stopping import Collapsed


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, so native libraries' output too) appended to
    `log` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_one(spec: dict) -> bool:
    """Run one job; False after an expected failure (recorded in failure.json, the reason printed)."""
    run_dir = Path(spec["run_dir"])
    try:
        run(spec)
    except (JobError, NonFiniteLoss, Collapsed) as e:  # expected failures: the message says what to change
        record_failure(run_dir, str(e), expected=True, resumable=isinstance(e, JobError))
        print(f"error: {e}", file=sys.stderr)
        return False
    except Exception as e:
        record_failure(run_dir, f"{type(e).__name__}: {e}")
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearning.train")
    parser.add_argument("specs", type=Path, nargs="+", help="job specs written by `unlearn unlearn`")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    args = parser.parse_args(argv)
    watch_parent()  # never outlive the unlearn process that launched us
    specs = [json.loads(path.read_text()) for path in args.specs]
    with ranks_hold([Path(spec["run_dir"]) for spec in specs]):
        for spec in specs:
            run_dir = Path(spec["run_dir"])
            if (run_dir / "run_summary.json").is_file():
                continue
            with output_to(run_dir / "train.log") if len(args.specs) > 1 else contextlib.nullcontext():
                ok = run_one(spec)
            if ok and os.environ.get(EXIT_ENV) == os.environ.get("RANK"):
                os.abort()  # fault injection: a rank dying natively after its job finished
            gc.collect()  # the last job's engine, before the next one builds its own
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not ok:
                return FAILED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
