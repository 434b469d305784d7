"""Training engines: the objects the one training loop drives.

An engine exposes DeepSpeed's step semantics: `engine(**batch)` runs the model, `backward(loss)`
accumulates gradients of `loss / grad_accum`, and `step()` is called after every micro-batch and
updates the weights (clip, optimizer, schedule) at each accumulation boundary. `TorchEngine` is the
single-process implementation used to build target/oracle models on one device; DeepSpeed specifics
live in this module only.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unlearning.train import complete


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str = "cosine"
                ) -> Any:
    """Linear warm-up over `ceil(warmup_ratio·total)` optimizer steps, then cosine decay to zero at `total_steps`
    or (`kind="constant"`) the full learning rate."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(warmup_ratio * total_steps)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def adamw(params: list[torch.nn.Parameter], *, max_grad_norm: float | None = None, **hyper: Any
          ) -> torch.optim.AdamW:
    """torch's AdamW with the fused kernel where torch has one (CPU, CUDA): one pass per tensor.

    With `max_grad_norm` and the fused kernel, a `ClippedAdamW` that clips inside the update;
    otherwise the caller clips (`clips_gradients` says which).
    """
    if all(p.device.type in ("cpu", "cuda") for p in params):
        if max_grad_norm is not None:
            return ClippedAdamW(params, max_grad_norm=max_grad_norm, **hyper)
        return torch.optim.AdamW(params, fused=True, **hyper)
    return torch.optim.AdamW(params, **hyper)


class ClippedAdamW(torch.optim.AdamW):
    """Fused AdamW that first clips the gradients' global L2 norm to `max_grad_norm`, within the update.

    The clip coefficient reaches the fused kernel as its gradient divisor (`grad_scale`, the hook AMP
    uses to unscale gradients), so a step reads the gradients once for the norm and once in the update,
    without the pass of `clip_grad_norm_` that rescales them all in place. The kernel still writes the
    unscaled gradients back (AMP's contract), so the saving is one read of the gradients: on a 26M-
    parameter model on CPU, 24-31 ms a step against 31 ms for `clip_grad_norm_` then fused AdamW.
    The result is that of `clip_grad_norm_` then AdamW, up to float rounding (a division instead of a
    multiplication).
    """

    def __init__(self, params: Any, *, max_grad_norm: float, **hyper: Any):
        super().__init__(params, fused=True, **hyper)
        self.max_grad_norm = max_grad_norm

    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            self.grad_scale = ((norm + 1e-6) / self.max_grad_norm).clamp(min=1.0)  # torch's clip: max/(norm+1e-6)
        return super().step(closure)


def clips_gradients(optimizer: Any) -> bool:
    return isinstance(optimizer, ClippedAdamW)


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
        self.optimizer = adamw(params, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        self.scheduler = lr_schedule(self.optimizer, total_steps, warmup_ratio)
        self.micro_steps = 0

    def __call__(self, **batch: torch.Tensor) -> Any:
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if not clips_gradients(self.optimizer):
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


def import_model_code(path: str | Path, *, trust_remote_code: bool = False) -> None:
    """Import the modeling code of the causal LM at `path` (its config only, no weights).

    A memory baseline taken afterwards holds the libraries the model runs on: transformers imports a
    model's module, and what that pulls in (over 100 MB for Llama), only when the first model is built.
    Models with remote code are left to load theirs with the weights.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with contextlib.suppress(KeyError):
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


# --- DeepSpeed: everything below is the only ZeRO-specific code of the project. ---------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_distributed() -> Dist:
    """Join the process group the launcher set up (gloo on CPU, the accelerator's backend on GPUs)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def load_for_training(path: str | Path, ds_config: dict[str, Any], *, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a causal LM for a DeepSpeed run; under ZeRO-3 it is partitioned while it loads.

    Returns:
        (model, handle): keep `handle` alive for the run; it tells transformers that ZeRO-3 is on.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                    use_safetensors=True)

    if ds_config["zero_optimization"]["stage"] == 3:
        handle = HfDeepSpeedConfig(ds_config)
        return load(), handle
    with plain_loading():  # whatever an earlier ZeRO-3 model in this process left registered
        return load(), None


@contextlib.contextmanager
def plain_loading() -> Iterator[None]:
    """Load models whole in this process even while a ZeRO-3 run is live (e.g. rank 0 exporting the
    consolidated weights); otherwise transformers would partition them over ranks that are not loading."""
    import transformers.integrations.deepspeed as hf_ds

    live = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_ds.set_hf_deepspeed_config(live)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any], *, total_steps: int, warmup_ratio: float,
               schedule: str = "cosine") -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and a warm-up, then cosine or constant schedule over
    `total_steps` (`lr_schedule`)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, ds_config = _client_optimizer(params, ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=lambda opt: lr_schedule(opt, total_steps, warmup_ratio, schedule))
    if ds_config["zero_optimization"]["stage"] == 0 and dist.get_world_size() == 1:
        # Without ZeRO, DeepSpeed all-reduces gradients through a flat copy of all of them, even alone:
        # one model's size of memory and two copies per step for a reduction that changes nothing.
        engine.enable_backward_allreduce = False
    return engine


def _client_optimizer(params: list[torch.nn.Parameter], ds_config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """torch's fused AdamW for the config's `torch_adam` optimizer, and the config left to DeepSpeed.

    DeepSpeed builds torch's AdamW with the per-tensor loop (a dozen kernel launches per parameter); the
    fused kernel does one pass per tensor on CPU and CUDA, as `transformers.Trainer` does by default. Under
    ZeRO, DeepSpeed hands this optimizer its fp32 partitions, so the update is the same AdamW. Without
    ZeRO or bf16, DeepSpeed steps it directly, so it also clips (`ClippedAdamW`) in place of DeepSpeed,
    whose clipping rescales every gradient tensor in a pass of its own. With offload the config's
    DeepSpeed CPU Adam stays, and None is returned.
    """
    spec = ds_config.get("optimizer", {})
    hyper = dict(spec.get("params", {}))
    if not hyper.pop("torch_adam", False):
        return None, ds_config
    rest = {k: v for k, v in ds_config.items() if k != "optimizer"}
    alone = ds_config["zero_optimization"]["stage"] == 0 and not ds_config["bf16"]["enabled"]
    clip = ds_config["gradient_clipping"] if alone and ds_config["gradient_clipping"] else None
    optimizer = adamw(params, lr=hyper["lr"], betas=tuple(hyper["betas"]), eps=hyper["eps"],
                      weight_decay=hyper["weight_decay"], max_grad_norm=clip)
    if clips_gradients(optimizer):
        rest["gradient_clipping"] = 0.0
    return optimizer, rest


def frozen_reference(path: str | Path, ds_config: dict[str, Any], *, dtype: torch.dtype,
                     trust_remote_code: bool) -> Any:
    """A frozen copy of the starting model for live reference logits (partitioned under ZeRO-3)."""
    import deepspeed

    stage = ds_config["zero_optimization"]["stage"]
    ref_config = {"train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
                  "train_batch_size": ds_config["train_batch_size"],
                  "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
                  "bf16": ds_config["bf16"], "zero_optimization": {"stage": 3 if stage == 3 else 0}}
    model, handle = load_for_training(path, ref_config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ref_config)
    engine.module.eval()
    engine._unlearning_handle = handle  # keeps the ZeRO-3 marker alive as long as the engine
    return engine


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], *, frozen: bool = True,
                    keep: int = 2) -> None:
    """Save a DeepSpeed checkpoint tagged `step<N>` (all ranks), complete or invisible, and prune all but the
    newest `keep`.

    Every rank writes and flushes its own files; after a barrier rank 0 records them and only then moves the
    `latest` pointer (`unlearning.train.complete`), so a rank killed mid-save leaves the previous complete
    checkpoint as the one to resume from. `frozen=False` leaves frozen parameters out (LoRA: they are the
    target's weights, reloaded on resume).
    """
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, exclude_frozen_parameters=not frozen,
                           save_latest=False)
    complete.flush_dir(ckpt_dir / tag)
    dist.barrier()
    if dist.get_rank() == 0:
        complete.mark_complete(ckpt_dir, tag, keep)
    dist.barrier()


def load_latest(engine: Any, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint of `ckpt_dir` into `engine` (an incomplete newer one, left by a rank
    killed mid-save, is skipped); its client state, or None if there is none."""
    tag = complete.latest_complete(ckpt_dir)
    if tag is None:
        return None
    path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"could not load the checkpoint {ckpt_dir / tag}; delete {ckpt_dir} to start the run over")
    return dict(state or {})


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint's tag."""
    return complete.latest_complete(ckpt_dir)


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a (possibly ZeRO-partitioned) checkpoint, read on one process.

    Stages 1-3 keep fp32 master weights in partitioned optimizer states, which DeepSpeed's zero_to_fp32
    reassembles; without ZeRO the model-states file holds the whole module.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def gathered_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's current weights, gathered from every rank under ZeRO-3 (a collective call)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
