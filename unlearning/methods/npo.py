"""Negative Preference Optimization (Zhang et al. 2024, eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


@METHODS.register("npo", gamma=1.0, alpha=1.0, retain_loss="nll", cached_ref=True)
def npo(forget: SequenceLogProbs, *, beta: float = 0.1) -> torch.Tensor:
    """L = −(2/β)·mean_i log σ(−β·(logπ_θ(y_i|x_i) − logπ_ref(y_i|x_i))).

    At log-ratio 0 the loss is (2/β)·log 2. Shapes: forget.logp and forget.ref_logp are (B,).
    """
    if forget.ref_logp is None:
        raise ValueError("npo needs reference log-probs (forget.ref_logp)")
    log_ratio = forget.logp - forget.ref_logp
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
