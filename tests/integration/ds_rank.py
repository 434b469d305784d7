"""One rank of a DeepSpeed run of the shared training loop (started by torchrun from the tests).

Usage, from the repository root: python -m torch.distributed.run --nproc-per-node=2 \
    -m tests.integration.ds_rank OUT_DIR STAGE
Rank 0 writes OUT_DIR/losses-STAGE.json with the per-step losses and learning rates.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from tests.conftest import pico_raw
from unlearning.config import TrainConfig, validate_config
from unlearning.data.prepare import prepare
from unlearning.data.tokenize import collate
from unlearning.models import tiny_llama
from unlearning.train.engine import deepspeed_config, warmup_cosine
from unlearning.train.loop import nll_objective, run_loop


def main(out: Path, stage: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = validate_config(pico_raw(out / "run"))
    prepared = prepare(cfg) if rank == 0 else None
    torch.distributed.barrier()
    prepared = prepared or prepare(cfg)
    tok, rows = prepared.tokenizer(), list(prepared.splits()["retain"])  # 24 rows: 6 steps of 4
    train = TrainConfig(zero_stage=stage, batch_size=2, lr=1e-3, warmup_ratio=0.2)
    model = tiny_llama(cfg, tok)
    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(train, world),
                                      model_parameters=list(model.parameters()),
                                      lr_scheduler=lambda opt: warmup_cosine(opt, 5, train.warmup_ratio))

    def batches():  # rank r takes its slice of one seeded global order
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        for i in range(0, len(order) - 2 * world + 1, 2 * world):
            yield collate([rows[j] for j in order[i + 2 * rank: i + 2 * rank + 2]], tok.pad_token_id)

    result = run_loop(engine, batches(), nll_objective, max_steps=5, grad_accum=1)
    if rank == 0:
        (out / f"losses-{stage}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
