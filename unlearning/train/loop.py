"""The one training loop, shared by model building and every unlearning method.

The loop knows nothing about methods: an `Objective` turns (engine, micro-batch) into a scalar loss and
a dict of float metrics; the engine handles accumulation, clipping and the optimizer.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearning.methods.logprobs import mean_token_nll

Objective = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stops and earlier checkpoints are left intact."""


@dataclass
class LoopResult:
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def nll_objective(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain fine-tuning: mean NLL of the answer tokens."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = mean_token_nll(out.logits, batch["labels"])
    return loss, {"loss": float(loss.detach())}


def run_loop(engine: Any, batches: Iterator[dict[str, torch.Tensor]], objective: Objective, *,
             max_steps: int, grad_accum: int, desc: str = "train", show_progress: bool | None = None) -> LoopResult:
    """Run `max_steps` optimizer steps of `grad_accum` micro-batches each.

    Metrics are averaged over each step's micro-batches and appended to `history` with `step` and `lr`.

    Raises:
        NonFiniteLoss: a micro-batch loss is NaN or inf.
    """
    result = LoopResult()
    start = time.perf_counter()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    bar = tqdm(total=max_steps, desc=desc, disable=not show, leave=False)
    engine.module.train()
    for step in range(1, max_steps + 1):
        sums: dict[str, float] = {}
        lr = engine.get_lr()[0]  # the rate this step's update uses
        for _ in range(grad_accum):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"{desc}: the batch iterator ran out at step {step} of {max_steps}")
            loss, metrics = objective(engine, batch)
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteLoss(f"{desc}: loss is {float(loss.detach())} at step {step}; lower the "
                                    "learning rate or add a stopping rule")
            engine.backward(loss)
            engine.step()
            result.tokens += int(batch["attention_mask"].sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / grad_accum
        result.history.append({"step": step, "lr": lr, **sums})
        result.steps = step
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()})
    bar.close()
    result.wall_s = time.perf_counter() - start
    return result
