"""Weighted gradient ascent, WGA (Wang et al. 2025, "Rethinking LLM unlearning objectives")."""

from __future__ import annotations

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import AnswerTokens


@METHODS.register("wga", gamma=1.0, alpha=1.0, retain_loss="nll")
def wga(forget_tokens: AnswerTokens, *, beta: float = 1.0) -> torch.Tensor:
    """L = mean_t p_t^β · log p_t over the forget answer tokens, the weight p_t^β = π_θ(y_t|…)^β detached.

    Gradient ascent whose tokens weigh by their own probability: tokens already forgotten (p_t → 0) stop
    pulling, so the loss does not run off to −∞ as plain ascent does (open-unlearning's compute_wga_loss).
    """
    logp = forget_tokens.logp()
    weight = logp.detach().exp().pow(beta)
    return forget_tokens.mean(weight * logp)
