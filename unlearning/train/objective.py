"""Compose a method's forget loss and a retain term into the loop's objective: γ·forget + α·retain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearning.methods import METHODS, RETAIN_LOSSES
from unlearning.methods.answers import answer_logprobs_of
from unlearning.methods.logprobs import SequenceLogProbs
from unlearning.schema import MethodConfig

RefLogits = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def needs(method: MethodConfig) -> dict[str, bool]:
    """What a configured method needs besides the forget batch."""
    meta = METHODS.get(method.name).meta
    retain = method.retain_loss not in (None, "none") and (method.alpha or 0.0) > 0
    return {
        "ref_logp": bool(meta.get("needs_ref")),
        "idk": bool(meta.get("needs_idk")),
        "retain": retain,
        "ref_model": retain and bool(RETAIN_LOSSES.get(str(method.retain_loss)).meta.get("needs_ref_model")),
    }


def _answer_logprobs(engine: Any, batch: dict[str, torch.Tensor], pack: bool) -> SequenceLogProbs:
    seq = answer_logprobs_of(engine, batch, pack=pack).with_norm(batch.get("answer_norm"))
    return seq.with_ref(batch["ref_logp"]) if "ref_logp" in batch else seq


@dataclass
class UnlearningObjective:
    """The objective of an unlearning run.

    Called with the engine and a micro-batch `{"forget": ..., "retain": ..., "idk": ...}` (each the output
    of `sampler.Stream.batch`), it returns the loss and detached scalar metrics: `loss`, `forget_loss`,
    `retain_loss` when there is a retain term, and `forget_nll`, the forget answers' mean token NLL
    (step-normalised, so its average over ranks and micro-batches is the global step's value).

    Args:
        method: the resolved method config (name, gamma, alpha, retain_loss and its parameters).
        ref_logits: the reference model's logits on a batch, for retain terms that need them.
        pack: let micro-batches run packed where the model supports it and it saves work (see
            `methods/answers.py`); the losses are the same either way, up to float rounding.
    """

    method: MethodConfig
    ref_logits: RefLogits | None = None
    pack: bool = True
    _needs: dict[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self._needs = needs(self.method)
        self._forget_fn = METHODS.get(self.method.name).fn
        self._retain_fn = RETAIN_LOSSES.get(str(self.method.retain_loss)).fn if self._needs["retain"] else None
        if self._needs["ref_model"] and self.ref_logits is None:
            raise ValueError(f"retain loss {self.method.retain_loss!r} needs a reference model's logits")

    def __call__(self, engine: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = _device(engine)
        batch = {name: {k: v.to(device) for k, v in part.items()} for name, part in batch.items()}
        forget = _answer_logprobs(engine, batch["forget"], self.pack)
        inputs = {"forget": forget}
        if self._needs["idk"]:
            inputs["idk"] = _answer_logprobs(engine, batch["idk"], self.pack)
        forget_loss = self._forget_fn(**inputs, **self.method.params)
        loss = float(self.method.gamma or 0.0) * forget_loss
        metrics = {"forget_loss": forget_loss.detach(), "forget_nll": -forget.token_mean().detach()}
        if self._retain_fn is not None:
            retain = batch["retain"]
            if self._needs["ref_model"]:  # a term over the whole next-token distributions (KL)
                logits = engine(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
                with torch.no_grad():
                    ref = self.ref_logits(retain) if self.ref_logits is not None else None
                retain_loss = self._retain_fn(logits, retain, ref)
            else:
                retain_loss = self._retain_fn(_answer_logprobs(engine, retain, self.pack))
            loss = loss + float(self.method.alpha or 0.0) * retain_loss
            metrics["retain_loss"] = retain_loss.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


def _device(engine: Any) -> torch.device:
    device = getattr(engine, "device", None)
    return device if isinstance(device, torch.device) else next(engine.module.parameters()).device
