"""Entry point of one rank: `python -m unlearning.train SPEC.json` (started by torchrun or deepspeed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unlearning.train.job import FAILED_EXIT, JobError, record_failure, run
from unlearning.train.loop import NonFiniteLoss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearning.train")
    parser.add_argument("spec", type=Path, help="job spec written by `unlearn unlearn`")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    run_dir = Path(spec["run_dir"])
    try:
        run(spec)
    except (JobError, NonFiniteLoss) as e:  # expected failures: the message says what to change
        record_failure(run_dir, str(e))
        print(f"error: {e}", file=sys.stderr)
        return FAILED_EXIT
    except Exception as e:
        record_failure(run_dir, f"{type(e).__name__}: {e}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
