"""Unlearning methods: each a small loss function registered by name in `METHODS`.

A method's function declares what it reads by its positional parameters, each a name from `READS`:
`forget` (the forget answers' `SequenceLogProbs`), `forget_tokens` (the logits at the forget answers'
positions, `AnswerTokens`), `ref_forget_tokens` (the same under the reference model, live), `aux_forget_tokens`
(the same under the method's auxiliary model, live: KGA's model fine-tuned on the forget set), `forget_hidden`
(the output of the method's `layer`, `HiddenStates`), `forget_const` (per-item constants computed before
training), `idk` (the refusal answers), `alt` (alternative answers the target wrote, `data/alternatives.py`),
and so on; the objective computes those and nothing else. Its keyword-only arguments are its hyper-parameters.

Registry metadata holds the default weights (`gamma` forget, `alpha` retain), the default retain term,
`cached_ref` (the starting model's sequence log-probs of the paired streams, computed once before training and
attached to `forget` / `idk` / `alt` as `ref_logp`), `trains` (the parameter naming the regexes of the weights
that train; all of them otherwise), `dual` (a function updating the retain weight after each optimizer step,
`methods/pdu.py`), `auxiliary` (a function of the method's parameters naming the models the build stage
fine-tunes for it, each by its training splits; the one named `aux` is loaded live by the ranks) and
`constants` (a function computing the `const` values from the target and those models before the launch,
`methods/kga.py`). An in-context method (`in_context`, `methods/icul.py`) trains nothing: it takes the rows of
one evaluated question and returns the `Context` put before it. Retain terms live in
`RETAIN_LOSSES` and declare their reads the same way (`retain`, `retain_logits`, `ref_retain_hidden`, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from unlearning.registry import Entry, Registry

STREAMS = ("forget", "idk", "alt", "retain")
KINDS = {"": "SequenceLogProbs: summed answer log-prob and length of each sequence",
         "tokens": "AnswerTokens: the logits at the answer positions only",
         "logits": "PositionLogits: the logits at every position",
         "hidden": "HiddenStates: the output of the method's `layer` module",
         "const": "(B,) per-item constants computed once before training by the method's `constants`"}
# Whose forward a read is of: the model being trained, the live reference model (the adapter off under LoRA, a
# frozen copy of the target otherwise) or the method's auxiliary model (a frozen copy of its `aux` model).
MODELS = {"": "trained", "ref": "reference", "aux": "auxiliary"}


@dataclass(frozen=True)
class Read:
    """One input a loss reads: a stream's micro-batch, what of the model's forward, and which model."""

    stream: str
    kind: str  # a key of KINDS
    model: str = ""  # a key of MODELS


def parse_read(name: str) -> Read | None:
    """The `Read` a parameter name stands for (`ref_retain_hidden` → retain, hidden, reference), or None.
    Constants are the trained stream's own (`forget_const`), never a model's."""
    model, _, rest = name.partition("_")
    if model not in MODELS or not model:
        model, rest = "", name
    stream, _, kind = rest.partition("_")
    if stream not in STREAMS or kind not in KINDS or (kind == "const" and model):
        return None
    return Read(stream, kind, model)


READS = sorted(f"{m + '_' if m else ''}{s}{'_' + k if k else ''}" for m in MODELS for s in STREAMS for k in KINDS
               if not (k == "const" and m))


def reads(entry: Entry) -> dict[str, Read]:
    """What a registered loss reads, from its positional parameters, in order."""
    params = inspect.signature(entry.fn).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {name: read for name in named if (read := parse_read(name)) is not None}


CONTEXT_ARGS = ["question_row", "forget_row", "retain_rows", "rng"]


def _check(entry: Entry, *, retain_term: bool) -> None:
    """Registration-time checks: every positional parameter is a known read of the right streams; an in-context
    method takes the rows its `Context` is built from instead (`CONTEXT_ARGS`)."""
    params = inspect.signature(entry.fn).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if entry.meta.get("in_context"):
        if retain_term or named != CONTEXT_ARGS:
            raise ValueError(f"{entry.name}: an in-context method takes ({', '.join(CONTEXT_ARGS)}), got {named}")
        return
    unknown = [n for n in named if parse_read(n) is None]
    if unknown:
        raise ValueError(f"{entry.name}: positional parameters {unknown} are not reads; valid: {', '.join(READS)}")
    streams = {r.stream for r in reads(entry).values()}
    allowed = {"retain"} if retain_term else {"forget", "idk", "alt"}
    if not streams or not streams <= allowed:
        raise ValueError(f"{entry.name}: reads {sorted(streams)}; a {'retain term' if retain_term else 'method'} reads "
                         f"the {' / '.join(sorted(allowed))} stream(s)")
    if any(r.kind == "hidden" for r in reads(entry).values()) and not retain_term and "layer" not in entry.params:
        raise ValueError(f"{entry.name}: reads hidden states, so it needs a `layer` keyword parameter")
    if entry.meta.get("cached_ref") and not ({"forget", "idk", "alt"} & set(reads(entry))):
        raise ValueError(f"{entry.name}: cached_ref attaches reference log-probs to `forget` / `idk`, which it "
                         "does not read")
    if any(r.model == "aux" for r in reads(entry).values()) and not entry.meta.get("auxiliary"):
        raise ValueError(f"{entry.name}: reads the auxiliary model, so it needs `auxiliary` naming that model")
    if any(r.kind == "const" for r in reads(entry).values()) != bool(entry.meta.get("constants")):
        raise ValueError(f"{entry.name}: a method reads `const` values exactly when it registers `constants`")
    trains = entry.meta.get("trains")
    if trains is not None and trains not in entry.params:
        raise ValueError(f"{entry.name}: trains={trains!r} is not one of its parameters")


def in_context(method: Any) -> bool:
    """Whether a configured method (a `MethodConfig`) trains nothing and changes the prompt instead."""
    return bool(METHODS.get(method.name).meta.get("in_context"))


def method_reads(method: Any) -> dict[str, Read]:
    """Everything a configured method (a `MethodConfig`) reads: its loss's and its retain term's (nothing for an
    in-context method)."""
    if in_context(method):
        return {}
    out = dict(reads(METHODS.get(method.name)))
    if retain_active(method):
        out.update(reads(RETAIN_LOSSES.get(str(method.retain_loss))))
    return out


def retain_active(method: Any) -> bool:
    return method.retain_loss not in (None, "none") and (method.alpha or 0.0) > 0


def _check_method(entry: Entry) -> None:
    _check(entry, retain_term=False)


def _check_retain(entry: Entry) -> None:
    _check(entry, retain_term=True)


METHODS = Registry("method", check=_check_method)
RETAIN_LOSSES = Registry("retain loss", check=_check_retain)

from unlearning.methods import (  # noqa: E402,F401  (registration)
    altpo,
    ceu,
    finetune,
    ga,
    icul,
    idkdpo,
    instruct,
    kga,
    npo,
    pdu,
    retain,
    rmu,
    satimp,
    simnpo,
    undial,
    wga,
)
