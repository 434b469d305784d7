"""The one training loop, shared by model building and every unlearning method.

The loop knows nothing about methods: an `Objective` turns (engine, micro-batch) into a scalar loss and
a dict of detached scalar metric tensors; the engine handles accumulation, clipping and the optimizer.
Metrics stay on the device until the end of each step, which reads them all at once (one device sync
per step, not one per metric and micro-batch).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from unlearning.methods.answers import answer_logprobs_of

Objective = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
OnStep = Callable[[dict[str, float]], str | None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stops and earlier checkpoints are left intact."""


@dataclass
class LoopResult:
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    stopped_by: str = "max_steps"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def nll_objective(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain fine-tuning: mean NLL of the answer tokens."""
    loss = -answer_logprobs_of(engine, batch).token_mean()
    return loss, {"loss": loss.detach()}


def _tokens(batch: dict[str, Any]) -> int:
    """Real tokens in a micro-batch, or in every part of a nested one ({"forget": ..., "retain": ...})."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(_tokens(part) for part in batch.values() if isinstance(part, dict))


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def mean_over_ranks(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's metrics averaged over the ranks of the process group, read off the device in one go."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].double() for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def run_loop(engine: Any, batches: Iterator[dict[str, Any]], objective: Objective, *, max_steps: int,
             grad_accum: int, desc: str = "train", show_progress: bool | None = None, start_step: int = 0,
             on_step: OnStep | None = None) -> LoopResult:
    """Run optimizer steps `start_step + 1 .. max_steps` of `grad_accum` micro-batches each.

    A step's metrics are averaged over its micro-batches and over the ranks, then appended to
    `history` with `step` and `lr`; every rank sees the same values, so every rank takes the same
    decisions. After each step, `on_step(record)` (the history entry) may checkpoint, and returns a
    reason to stop early or None.

    Raises:
        NonFiniteLoss: a step's loss is NaN or inf (raised on every rank, before `on_step`, so no
            checkpoint of the broken weights is written).
    """
    result = LoopResult(steps=start_step)
    start = time.perf_counter()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    bar = tqdm(total=max_steps, initial=start_step, desc=desc, disable=not show, leave=False)
    engine.module.train()
    for step in range(start_step + 1, max_steps + 1):
        sums: dict[str, torch.Tensor] = {}
        lr = engine.get_lr()[0]  # the rate this step's update uses
        for _ in range(grad_accum):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"{desc}: the batch iterator ran out at step {step} of {max_steps}")
            loss, metrics = objective(engine, batch)
            engine.backward(loss)
            engine.step()
            result.tokens += _tokens(batch)
            for k, v in metrics.items():
                sums[k] = sums[k] + v / grad_accum if k in sums else v / grad_accum
        means = mean_over_ranks(sums)
        if not math.isfinite(means.get("loss", 0.0)):
            raise NonFiniteLoss(f"{desc}: the loss is {means['loss']} at step {step}; lower train.lr, or bound "
                                "the run with train.max_steps or a train.stop rule")
        record = {"step": step, "lr": lr, **means}
        result.history.append(record)
        result.steps = step
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
        if not show and _is_rank0() and (step % max(1, max_steps // 10) == 0 or step == max_steps):
            print(f"{desc}: step {step}/{max_steps} " + " ".join(f"{k}={v:.4f}" for k, v in means.items()),
                  flush=True)  # progress for logs, where no bar is drawn
        reason = on_step(record) if on_step else None
        if reason:
            result.stopped_by = reason
            break
    bar.close()
    result.wall_s = time.perf_counter() - start
    return result
