"""Rank-aware, resumable micro-batch sampling.

Each stream (forget, retain) has one seeded global order per epoch. An optimizer step consumes the
next `G = B·W·A` items of it (micro-batch B, world size W, accumulation A), and micro-step k of rank r
takes the B items at offset (k·W + r)·B. Hence:

- every rank draws different samples, deterministically from the seed;
- at a fixed effective batch G, the items of every step do not depend on how G is split into ranks
  and micro-batches (the 1-rank vs 2-rank and batch × accumulation invariances);
- a resumed run starts at any step without replaying the ones before it.

Each micro-batch also carries the step normalisers (`answer_norm`, `position_norm`, see
`methods/logprobs.py`), computed from all G items of the step, which every rank can see, and the step's
per-item answer lengths (`step_answer_tokens`) and micro-batch count, from which a loss that counts only
some of each answer's tokens derives its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearning.data.tokenize import collate
from unlearning.hashing import content_hash
from unlearning.methods.logprobs import answer_token_count


@dataclass(frozen=True)
class Layout:
    """How an optimizer step is split: micro-batch per rank, world size, accumulation steps."""

    micro: int
    world: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum


def _epoch_order(n: int, seed: int, stream: str, epoch: int) -> list[int]:
    key = int(content_hash(seed, stream, epoch), 16) % (2**63)
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)).tolist()


def step_items(n: int, layout: Layout, seed: int, stream: str, step: int) -> list[int]:
    """The G item indices of optimizer step `step` (0-based) of a stream of `n` items."""
    per_epoch = n // layout.global_batch
    if per_epoch < 1:
        raise ValueError(f"{stream}: {n} items cannot fill a global batch of {layout.global_batch}")
    epoch, pos = divmod(step, per_epoch)  # the last partial batch of an epoch is dropped
    order = _epoch_order(n, seed, stream, epoch)
    return order[pos * layout.global_batch:(pos + 1) * layout.global_batch]


class Stream:
    """Encoded examples of one split and the per-example counts the step normalisers need.

    Args:
        rows: encoded examples (`input_ids`, `labels`, `attention_mask`).
        name: the stream's name; it seeds an order independent of the other streams.
        extra: per-example tensors to gather alongside each batch (e.g. cached reference log-probs),
            each (N,).
    """

    def __init__(self, rows: Sequence[dict[str, Any]], name: str, extra: dict[str, torch.Tensor] | None = None):
        self.rows = rows
        self.name = name
        self.extra = extra or {}
        self.answer_tokens = torch.tensor([answer_token_count(r["labels"]) for r in rows], dtype=torch.float64)
        self.positions = torch.tensor([len(r["input_ids"]) - 1 for r in rows], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, items: list[int], step_items: list[int], micro_batches: int, pad_id: int) -> dict[str, Any]:
        out: dict[str, Any] = collate([self.rows[i] for i in items], pad_id)
        out["answer_norm"] = self.answer_tokens[step_items].sum() / micro_batches
        out["position_norm"] = self.positions[step_items].sum() / micro_batches
        out["step_answer_tokens"] = self.answer_tokens[step_items]  # per-token losses' own normalisers
        out["micro_batches"] = torch.tensor(micro_batches)
        out["index"] = torch.tensor(items)
        for key, values in self.extra.items():
            out[key] = values[items]
        return out


def micro_batches(streams: dict[str, Stream], layout: Layout, *, rank: int, seed: int, pad_id: int,
                  start_step: int = 0, paired: dict[str, str] | None = None) -> Iterator[dict[str, dict[str, Any]]]:
    """Endless micro-batches for `rank`, starting at optimizer step `start_step`.

    Each yielded item maps a stream name to its micro-batch. `paired` maps a stream to the stream whose
    item indices it shares (e.g. the refusal answers of IdkDPO follow the forget questions).
    """
    paired = paired or {}
    step = start_step
    while True:
        chosen = {name: step_items(len(s), layout, seed, name, step) for name, s in streams.items()
                  if name not in paired}
        for name, lead in paired.items():
            chosen[name] = chosen[lead]
        for k in range(layout.accum):
            offset = (k * layout.world + rank) * layout.micro
            yield {name: s.batch(chosen[name][offset:offset + layout.micro], chosen[name],
                                 layout.world * layout.accum, pad_id)
                   for name, s in streams.items()}
        step += 1
