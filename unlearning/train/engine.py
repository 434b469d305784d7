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

    def get_lr(self) -> list[float]:
        """Current learning rate of each parameter group (DeepSpeedEngine's method of the same name)."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def deepspeed_config(train: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of an unlearning run, derived from `train.*` and the world size.

    The global batch is micro-batch × accumulation × world size; the optimizer is AdamW with torch's
    implementation (no JIT build) unless parameters or optimizer states are offloaded, where DeepSpeed's
    CPU Adam is the one that makes offload worthwhile. Offload combinations that would do nothing are
    rejected when the config is validated (`TrainConfig`).
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            "torch_adam": train.offload == "none"}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }

