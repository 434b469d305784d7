"""SimNPO: reference-free, length-normalised NPO (Fan et al. 2024, eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


@METHODS.register("simnpo", gamma=0.125, alpha=1.0, retain_loss="nll")
def simnpo(forget: SequenceLogProbs, *, beta: float = 4.5, delta: float = 0.0) -> torch.Tensor:
    """L = −(2/β)·mean_i log σ(β·(NLL(y_i|x_i)/|y_i| − δ)); forget.logp, forget.ntokens are (B,)."""
    mean_nll = -forget.logp / forget.ntokens.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()
