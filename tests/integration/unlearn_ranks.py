"""Several unlearning jobs in one set of ranks (one launcher start for many runs), for the tests.

Usage, from the repository root: python -m torch.distributed.run --nproc-per-node=2 \
    -m tests.integration.unlearn_ranks SPECS.json
Each spec is one `unlearning.unlearn.job_spec`; after each run, rank 0 also saves the engine's live
weights (gathered under ZeRO-3) as `engine_weights.safetensors` in the run directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import save_file

from unlearning.train.engine import gathered_state_dict
from unlearning.train.job import run


def launch_specs(specs: list[dict[str, Any]], nproc: int, path: Path) -> None:
    """Write `specs` to `path` and run them in one start of `nproc` torchrun ranks of this module; a failed launch
    fails the calling test with the ranks' output."""
    from tests.conftest import REPO
    from unlearning.train.launch import free_port, launch_argv

    path.write_text(json.dumps(specs))
    argv = launch_argv(launcher="torchrun", num_processes=nproc, num_nodes=1, args=[str(path)],
                       module="tests.integration.unlearn_ranks", master_port=free_port())
    res = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def main(specs_path: Path) -> None:
    for spec in json.loads(specs_path.read_text()):
        out = run(spec)
        weights = gathered_state_dict(out.engine)
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in weights.items()},
                      str(Path(spec["run_dir"]) / "engine_weights.safetensors"))
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
