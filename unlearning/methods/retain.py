"""Retain terms, added as α·retain_loss to keep the model's utility while it forgets.

Like a method, a retain term declares what it reads by its positional parameters (see `methods/__init__`):
`retain` (the retain answers' `SequenceLogProbs`, with the step normaliser), `retain_logits` /
`ref_retain_logits` (every position's logits under the model and the live reference), `retain_hidden` /
`ref_retain_hidden` (the output of the method's `layer`).
"""

from __future__ import annotations

import torch

from unlearning.methods import RETAIN_LOSSES
from unlearning.methods.logprobs import HiddenStates, PositionLogits, SequenceLogProbs, token_kl


@RETAIN_LOSSES.register("nll")
def nll(retain: SequenceLogProbs) -> torch.Tensor:
    """Mean token NLL of the retain answers."""
    return -retain.token_mean()


@RETAIN_LOSSES.register("kl")
def kl(retain_logits: PositionLogits, ref_retain_logits: PositionLogits) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the real tokens of the retain batch."""
    return token_kl(ref_retain_logits.logits, retain_logits.logits, retain_logits.attention_mask, retain_logits.norm)


@RETAIN_LOSSES.register("embed_diff")
def embed_diff(retain_hidden: HiddenStates, ref_retain_hidden: HiddenStates) -> torch.Tensor:
    """RMU's retain term: the mean squared distance between the method layer's activations on the retain
    answers and the reference model's (open-unlearning's EMBED_DIFF)."""
    return retain_hidden.mean_squared_distance(ref_retain_hidden.states.detach())
