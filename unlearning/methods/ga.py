"""Gradient ascent and GradDiff (gradient ascent on forget + NLL on retain)."""

from __future__ import annotations

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


def _ascent(forget: SequenceLogProbs) -> torch.Tensor:
    # −(mean token NLL) = Σ logp / Σ tokens over the batch; minimising it raises the forget NLL.
    return forget.token_mean()


@METHODS.register("ga", gamma=1.0, alpha=0.0, retain_loss="none")
def ga(forget: SequenceLogProbs) -> torch.Tensor:
    """Gradient ascent: the negated mean token NLL of the forget answers (unbounded below)."""
    return _ascent(forget)


@METHODS.register("graddiff", gamma=1.0, alpha=1.0, retain_loss="nll")
def graddiff(forget: SequenceLogProbs) -> torch.Tensor:
    """GradDiff: gradient ascent on forget; the loop adds α·retain loss (NLL or KL)."""
    return _ascent(forget)
