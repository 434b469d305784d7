"""Training engines: the objects the one training loop drives.

An engine exposes DeepSpeed's step semantics: `engine(**batch)` runs the model, `backward(loss)`
accumulates gradients of `loss / grad_accum`, and `step()` is called after every micro-batch and
updates the weights (clip, optimizer, schedule) at each accumulation boundary. `TorchEngine` is the
single-process implementation used to build target/oracle models on one device; DeepSpeed specifics
live in this module only.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warm-up over `ceil(warmup_ratio·total)` optimizer steps, then cosine decay to zero."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


class TorchEngine:
    """Single-process AdamW engine with gradient accumulation, clipping and a warm-up/cosine schedule.

    Args:
        module: the model; only parameters with `requires_grad` are optimised.
        lr, weight_decay, max_grad_norm: optimiser settings.
        grad_accum: micro-batches per optimizer step.
        total_steps: optimizer steps in the run (for the schedule).
        warmup_ratio: fraction of `total_steps` spent warming up.
    """

    def __init__(self, module: torch.nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float,
                 grad_accum: int, total_steps: int, warmup_ratio: float):
        self.module = module
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup_ratio)
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, **batch: torch.Tensor) -> Any:
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
