"""Per-example answer log-probs computed across the ranks of a job, and the reference cache.

NPO and IdkDPO compare the model being trained with the starting model on the forget answers. Instead
of holding a second model on every rank, the starting model's sequence log-probs are computed once, in
one sharded pass before the first step, and cached on disk: a resumed run and any other run from the
same model and data read them back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import load_file, save_file

from unlearning.evaluate.probes import answer_logprobs, normalised_probability


def sharded_answer_logprobs(module: Any, rows: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """`answer_logprobs` of every row, each rank scoring a strided share; every rank gets all values.

    Every rank runs the same number of forward passes (shares are padded with a repeated row), which
    ZeRO-3 needs: its forward gathers parameters collectively.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(rows), world))
    share = math.ceil(len(rows) / world)
    padded = mine + [mine[0] if mine else 0] * (share - len(mine))
    was_training = module.training
    logp, ntok = answer_logprobs(module, [rows[i] for i in padded], pad_id=pad_id, batch_size=batch_size)
    module.train(was_training)
    parts: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(parts, (mine, logp[:len(mine)], ntok[:len(mine)]))
    else:
        parts = [(mine, logp, ntok)]
    all_logp, all_ntok = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    for idx, lp, nt in parts:
        all_logp[idx], all_ntok[idx] = lp, nt
    return all_logp, all_ntok


def reference_logprobs(module: Any, streams: Mapping[str, Sequence[dict[str, Any]]], cache: Path, *, pad_id: int,
                       batch_size: int) -> dict[str, torch.Tensor]:
    """Sequence log-probs (N,) of each stream's answers under `module`, read from `cache` when present.

    Call this before the first training step, on every rank. Rank 0 writes the cache atomically.
    """
    if cache.is_file():
        saved = load_file(str(cache))
        if set(saved) >= set(streams) and all(len(saved[k]) == len(v) for k, v in streams.items()):
            return {k: torch.from_numpy(saved[k]) for k in streams}
    values = {name: sharded_answer_logprobs(module, rows, pad_id=pad_id, batch_size=batch_size)[0]
              for name, rows in streams.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        save_file(values, str(tmp))
        os.replace(tmp, cache)
    if dist.is_initialized():
        dist.barrier()
    return {k: torch.from_numpy(v) for k, v in values.items()}


def mean_probability(module: Any, rows: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int) -> float:
    """Mean length-normalised answer probability of `rows` (the utility-floor check), across ranks."""
    logp, ntok = sharded_answer_logprobs(module, rows, pad_id=pad_id, batch_size=batch_size)
    return float(normalised_probability(logp, ntok).mean())
