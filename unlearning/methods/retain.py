"""Retain terms, added as α·retain_loss to keep the model's utility while it forgets.

A retain function takes the retain answers' `SequenceLogProbs` (with the step normaliser `answer_norm`,
see `methods/logprobs.py`). One registered with `needs_ref_model` scores whole next-token distributions
instead: it takes the model's logits (B, T, V) on the retain micro-batch, the batch itself
(`attention_mask`, the step normaliser `position_norm`) and the reference model's logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unlearning.methods import RETAIN_LOSSES
from unlearning.methods.logprobs import SequenceLogProbs, token_kl


@RETAIN_LOSSES.register("nll")
def nll(retain: SequenceLogProbs) -> torch.Tensor:
    """Mean token NLL of the retain answers."""
    return -retain.token_mean()


@RETAIN_LOSSES.register("kl", needs_ref_model=True)
def kl(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], ref_logits: torch.Tensor | None = None
       ) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the real tokens of the retain batch (needs live reference logits)."""
    if ref_logits is None:
        raise ValueError("the kl retain loss needs the reference model's logits")
    return token_kl(ref_logits, logits, batch["attention_mask"], batch.get("position_norm"))
