"""IdkDPO: DPO preferring an "I don't know" reply over the true answer (Maini et al. 2024, TOFU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


@METHODS.register("idkdpo", gamma=1.0, alpha=1.0, retain_loss="nll", cached_ref=True)
def idkdpo(forget: SequenceLogProbs, idk: SequenceLogProbs, *, beta: float = 0.1) -> torch.Tensor:
    """L = −(2/β)·mean_i log σ(β·[(logπ_θ − logπ_ref)(y_idk) − (logπ_θ − logπ_ref)(y)]).

    `forget` holds the true answers (dispreferred), `idk` the refusals (preferred); each is (B,).
    """
    if forget.ref_logp is None or idk.ref_logp is None:
        raise ValueError("idkdpo needs reference log-probs of both the true and the idk answers")
    margin = (idk.logp - idk.ref_logp) - (forget.logp - forget.ref_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
