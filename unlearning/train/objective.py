"""Compose a method's forget loss and a retain term into the loop's objective: γ·forget + α·retain.

A loss reads what its positional parameters name (`methods/__init__.READS`); the objective runs, per
stream of the micro-batch (forget, idk, alt, retain), one forward of the model being trained when anything
of that stream is read (the forget stream always: its answer NLL is the run's `forget_nll`), one of the
live reference model when a `ref_` read of that stream is declared, and one of the method's auxiliary model
for an `aux_` read. Each forward computes only what is read of it: the logits at the answer positions
(packed where that pays), the logits of every position, and/or the output of the method's `layer` (a
forward hook); `const` reads are the stream's per-item constants, gathered with the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearning.methods import METHODS, MODELS, RETAIN_LOSSES, Read, method_reads, reads, retain_active
from unlearning.methods.answers import answer_tokens_of, inner_model, kept_logits
from unlearning.methods.logprobs import IGNORE_INDEX, HiddenStates, PositionLogits, answer_layout, layout_tokens
from unlearning.schema import MethodConfig


@dataclass(frozen=True)
class Reference:
    """The live reference model: `model` called inside `switch()` (the adapter off under LoRA; a frozen
    copy, partitioned under ZeRO-3, with a no-op switch otherwise)."""

    model: Any
    switch: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


def needs(method: MethodConfig) -> dict[str, bool]:
    """What a configured method needs besides the forget batch, from its declared reads."""
    declared = method_reads(method).values()
    return {
        "ref_logp": bool(METHODS.get(method.name).meta.get("cached_ref")),
        "idk": any(r.stream == "idk" for r in declared),
        "alt": any(r.stream == "alt" for r in declared),
        "retain": retain_active(method),
        "ref_model": any(r.model == "ref" for r in declared),
        "aux_model": any(r.model == "aux" for r in declared),
        "const": any(r.kind == "const" for r in declared),
    }


def find_module(model: Any, name: str) -> torch.nn.Module:
    """The submodule called `name` (or ending in `.name`, as under a peft wrapper) of a model or engine."""
    found = [m for n, m in inner_model(model).named_modules() if n == name or n.endswith("." + name)]
    if len(found) != 1:
        raise ValueError(f"{len(found)} modules of the model are named {name!r}; expected exactly one")
    return found[0]


@contextlib.contextmanager
def _capture(model: Any, layer: str | None) -> Iterator[list[torch.Tensor]]:
    """Collect the output of `layer` (its first element when a tuple) during the forwards inside."""
    captured: list[torch.Tensor] = []
    if layer is None:
        yield captured
        return

    def hook(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = find_module(model, layer).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def forward(model: Any, batch: dict[str, Any], kinds: set[str], *, layer: str | None, pack: bool) -> dict[str, Any]:
    """One forward of `model` on a micro-batch, returning the `kinds` asked for (see `methods.KINDS`):
    "" and "tokens" from the answer-position logits, "logits" from every position, "hidden" from `layer`."""
    out: dict[str, Any] = {}
    with _capture(model, layer if "hidden" in kinds else None) as captured:
        if "logits" in kinds:
            full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out["logits"] = PositionLogits(full, batch["attention_mask"], batch.get("position_norm"))
            layout = answer_layout(batch, pack=False)
            tokens = layout_tokens(full[layout.keep], layout, batch)
        elif "hidden" in kinds:  # unpacked: the states keep the batch's (B, T) layout
            layout = answer_layout(batch, pack=False)
            tokens = layout_tokens(kept_logits(model, layout), layout, batch)
        else:
            tokens = answer_tokens_of(model, batch, pack=pack)
    out["tokens"] = tokens
    if "const" in kinds:
        out["const"] = batch["const"]
    seq = tokens.sequences()
    out[""] = seq.with_ref(batch["ref_logp"]) if "ref_logp" in batch else seq
    if "hidden" in kinds:
        out["hidden"] = HiddenStates(captured[0], batch["labels"] != IGNORE_INDEX)
    return out


@dataclass
class UnlearningObjective:
    """The objective of an unlearning run.

    Called with the engine and a micro-batch `{"forget": ..., "retain": ..., "idk": ...}` (each the output
    of `sampler.Stream.batch`), it returns the loss and detached scalar metrics: `loss`, `forget_loss`,
    `retain_loss` when there is a retain term, and `forget_nll`, the forget answers' mean token NLL
    (step-normalised, so its average over ranks and micro-batches is the global step's value).

    Args:
        method: the resolved method config (name, gamma, alpha, retain_loss and its parameters).
        reference: the live reference model, for losses with `ref_` reads.
        aux: the method's live auxiliary model, for losses with `aux_` reads (no switch: a frozen copy).
        pack: let micro-batches run packed where the model supports it and it saves work (see
            `methods/answers.py`); the losses are the same either way, up to float rounding.
    """

    method: MethodConfig
    reference: Reference | None = None
    pack: bool = True
    aux: Reference | None = None
    _reads: dict[str, Read] = field(init=False)

    def __post_init__(self) -> None:
        entry = METHODS.get(self.method.name)
        self._forget_fn, self._forget_reads = entry.fn, reads(entry)
        self._retain_fn, self._retain_reads = None, {}
        if retain_active(self.method):
            retain = RETAIN_LOSSES.get(str(self.method.retain_loss))
            self._retain_fn, self._retain_reads = retain.fn, reads(retain)
        self._reads = {**self._forget_reads, **self._retain_reads}
        self._layer = self.method.params.get("layer")
        self._dual = entry.meta.get("dual")
        self.retain_weight = float(self.method.alpha or 0.0)
        self._models = {"ref": self.reference, "aux": self.aux}
        for r in self._reads.values():
            if r.model and self._models[r.model] is None:
                raise ValueError(f"method {self.method.name!r} (retain {self.method.retain_loss!r}) reads the live "
                                 f"{MODELS[r.model]} model, and none was given")

    def forwards(self) -> dict[tuple[str, str], set[str]]:
        """(stream, model) → the kinds read of that forward: the forwards each micro-step runs."""
        plan: dict[tuple[str, str], set[str]] = {("forget", ""): {""}}
        for r in self._reads.values():
            plan.setdefault((r.stream, r.model), set()).add(r.kind)
        return plan

    def __call__(self, engine: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = _device(engine)
        batch = {name: {k: v.to(device) for k, v in part.items()} for name, part in batch.items()}
        outputs: dict[tuple[str, str], dict[str, Any]] = {}
        for (stream, model), kinds in self.forwards().items():
            other = self._models.get(model)
            if other is not None:
                with torch.no_grad(), other.switch():
                    outputs[stream, model] = forward(other.model, batch[stream], kinds, layer=self._layer,
                                                     pack=self.pack)
            else:
                outputs[stream, model] = forward(engine, batch[stream], kinds, layer=self._layer, pack=self.pack)

        def values(declared: dict[str, Read]) -> dict[str, Any]:
            return {name: outputs[r.stream, r.model][r.kind] for name, r in declared.items()}

        forget_loss = self._forget_fn(**values(self._forget_reads), **self.method.params)
        loss = float(self.method.gamma or 0.0) * forget_loss
        forget_nll = -outputs["forget", ""][""].token_mean().detach()
        metrics = {"forget_loss": forget_loss.detach(), "forget_nll": forget_nll}
        if self._retain_fn is not None:
            retain_loss = self._retain_fn(**values(self._retain_reads))
            loss = loss + self.retain_weight * retain_loss
            metrics["retain_loss"] = retain_loss.detach()
            if self._dual is not None:
                metrics["retain_weight"] = torch.tensor(self.retain_weight, device=device)
        metrics["loss"] = loss.detach()
        return loss, metrics


    def after_step(self, record: dict[str, float], epoch: float) -> None:
        """Update a dual retain weight (PDU) from the step's record (the same on every rank); `epoch`: the
        forget-set epochs done."""
        if self._dual is not None and "retain_loss" in record:
            self.retain_weight = self._dual(record["retain_weight"], record, epoch=epoch, **self.method.params)

    def resume(self, history: list[dict[str, float]], steps_per_epoch: int) -> None:
        """Restore the dual retain weight of a resumed run: the update after its last recorded step."""
        if self._dual is not None and history:
            last = history[-1]
            self.after_step(last, epoch=last["step"] / steps_per_epoch)


def _device(engine: Any) -> torch.device:
    device = getattr(engine, "device", None)
    return device if isinstance(device, torch.device) else next(engine.module.parameters()).device
