"""Several unlearning jobs in one set of ranks (one launcher start for many runs), for the tests.

Usage, from the repository root: python -m torch.distributed.run --nproc-per-node=2 \
    -m tests.integration.unlearn_ranks SPECS.json
Each spec is one `unlearning.unlearn.job_spec`; after each run, rank 0 also saves the engine's live
weights (gathered under ZeRO-3) as `engine_weights.safetensors` in the run directory.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from unlearning.train.engine import gathered_state_dict
from unlearning.train.job import run


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
