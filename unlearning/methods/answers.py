"""Answer log-probs of a model on a micro-batch, computing only the logits that score answer tokens.

Research frameworks project every position of every sequence onto the vocabulary, then mask the
question and the padding away. Here the model is asked (`logits_to_keep`, a bool mask) for the
positions that predict an answer token only, and, where it pays (`packing_pays`), the sequences run as
one packed row without padding. Both are checked once per model object on a short probe against its
plain forward (`Layouts`), so a model whose code ignores either falls back to the plain path instead
of returning wrong numbers.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unlearning.methods.logprobs import (
    AnswerLayout,
    AnswerTokens,
    SequenceLogProbs,
    answer_layout,
    layout_tokens,
    packing_pays,
)


@dataclass(frozen=True)
class Layouts:
    """What a model's forward honours: a bool `logits_to_keep` mask, and packed sequences (position ids
    restarting at 0 with no attention mask) kept apart in attention."""

    keep: bool
    pack: bool


_PROBED: weakref.WeakKeyDictionary[Any, Layouts] = weakref.WeakKeyDictionary()


def layouts(model: Any) -> Layouts:
    """The `Layouts` a model supports, probed on its first use (a collective call under ZeRO-3: every
    rank probes the same inputs)."""
    inner = inner_model(model)
    if inner not in _PROBED:
        _PROBED[inner] = _probe(inner)
    return _PROBED[inner]


def inner_model(model: Any) -> Any:
    """The model inside a training engine (DeepSpeed's or `TorchEngine`), else the model itself."""
    return getattr(model, "module", model)


@torch.no_grad()
def _probe(model: Any) -> Layouts:
    vocab = int(model.config.vocab_size)
    param = next(model.parameters())
    first = torch.tensor([(3 + 5 * i) % vocab for i in range(12)], device=param.device)
    second = torch.tensor([(7 + 11 * i) % vocab for i in range(6)], device=param.device)
    tol = 1e-3 if param.dtype == torch.float32 else 5e-2
    was_training = model.training
    model.eval()
    try:
        plain = F.log_softmax(model(input_ids=second[None]).logits[0].float(), -1)  # (6, V)
        mask = torch.tensor([[False, True, True, False, True, False]], device=param.device)
        keep = _agrees(lambda: model(input_ids=second[None], logits_to_keep=mask).logits, plain[mask[0]], tol)
        position_ids = torch.cat([torch.arange(12), torch.arange(6)]).to(param.device)[None]
        pack = _agrees(lambda: model(input_ids=torch.cat([first, second])[None], position_ids=position_ids,
                                     use_cache=False).logits[0, 12:], plain, tol)
    finally:
        model.train(was_training)
    return Layouts(keep=keep, pack=pack)


def _agrees(run: Any, expected: torch.Tensor, tol: float) -> bool:
    try:
        got = run()
    except RuntimeError as e:
        if _is_fatal(e):  # a real failure, whatever the layout: never read it as "unsupported"
            raise
        return False  # e.g. shapes a model's code cannot take in this layout
    except (TypeError, ValueError, IndexError):  # a forward without the argument, or another use of it
        return False
    got = got.reshape(-1, got.shape[-1])
    return got.shape == expected.shape and bool(
        (F.log_softmax(got.float(), -1) - expected).abs().max() <= tol)


def _is_fatal(error: RuntimeError) -> bool:
    """Errors of the device or the process group, which a fallback to the plain layout would hide."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError | dist.DistError) or any(
        sign in text for sign in ("out of memory", "can't allocate memory", "cuda error"))


def answer_logprobs_of(model: Any, batch: dict[str, torch.Tensor], *, pack: bool = True) -> SequenceLogProbs:
    """Summed answer log-prob and answer length of each sequence of a collated micro-batch.

    Args:
        model: a causal LM, a peft model, or a training engine around one.
        batch: `input_ids`, `labels` and `attention_mask`, (B, T), on the model's device.
        pack: allow packing (taken when the model supports it and it saves work).
    """
    return answer_tokens_of(model, batch, pack=pack).sequences()


def answer_tokens_of(model: Any, batch: Mapping[str, Any], *, pack: bool = True) -> AnswerTokens:
    """The logits at the answer positions of a collated micro-batch (and the step normalisers it carries)."""
    layout = answer_layout(dict(batch), pack=pack and packs(model, batch))
    return layout_tokens(kept_logits(model, layout), layout, batch)


def packs(model: Any, batch: Mapping[str, Any]) -> bool:
    """Whether this micro-batch runs packed: the model supports it and it saves work."""
    if not layouts(model).pack:
        return False
    hidden = getattr(inner_model(model).config, "hidden_size", None) or 1024
    return packing_pays(batch["attention_mask"].sum(1).tolist(), hidden)  # reading the lengths syncs


def kept_logits(model: Any, layout: AnswerLayout) -> torch.Tensor:
    """The logits (M, V) of the layout's kept positions only: asked of the model (`logits_to_keep`) where its
    forward honours that, else sliced from its full logits."""
    if layouts(model).keep:
        logits = model(**layout.inputs, logits_to_keep=layout.keep).logits
    else:
        logits = model(**layout.inputs).logits[layout.keep]
    return logits.reshape(-1, logits.shape[-1])
