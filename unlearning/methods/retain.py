"""Retain terms, added as α·retain_loss to keep the model's utility while it forgets."""

from __future__ import annotations

import torch

from unlearning.methods import RETAIN_LOSSES
from unlearning.methods.logprobs import mean_token_nll, token_kl


@RETAIN_LOSSES.register("nll")
def nll(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
        ref_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token NLL of the retain answers; logits (B, T, V), labels (B, T)."""
    return mean_token_nll(logits, labels)


@RETAIN_LOSSES.register("kl", needs_ref_model=True)
def kl(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
       ref_logits: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the real tokens of the retain batch (needs live reference logits)."""
    if ref_logits is None:
        raise ValueError("the kl retain loss needs the reference model's logits")
    return token_kl(ref_logits, logits, attention_mask)
