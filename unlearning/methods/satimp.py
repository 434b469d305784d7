"""SatImp: saturation and importance weighted ascent (Yang et al. 2025, "Exploring criteria of loss
reweighting to enhance LLM unlearning")."""

from __future__ import annotations

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import AnswerTokens


@METHODS.register("satimp", gamma=0.1, alpha=1.0, retain_loss="nll")
def satimp(forget_tokens: AnswerTokens, *, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """L = mean_t p_t^β1 · (1 − p_t)^β2 · log p_t over the forget answer tokens, both weights detached.

    p^β1 (saturation) lets go of tokens already unlikely, (1 − p)^β2 (importance) of tokens the model is
    sure of; open-unlearning's compute_satimp_loss and defaults (β1 = 5, β2 = 1, γ = 0.1, α = 1).
    """
    logp = forget_tokens.logp()
    p = logp.detach().exp()
    return forget_tokens.mean(p.pow(beta1) * (1 - p).pow(beta2) * logp)
