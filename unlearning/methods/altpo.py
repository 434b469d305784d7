"""AltPO, alternate preference optimisation (Mekala et al. 2024, arXiv:2409.13474)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


@METHODS.register("altpo", gamma=1.0, alpha=1.0, retain_loss="nll", cached_ref=True, alternatives=True)
def altpo(forget: SequenceLogProbs, alt: SequenceLogProbs, *, beta: float = 0.1, instruct: bool | None = None,
          tries: int = 8, temperature: float = 1.0, max_new_tokens: int = 32) -> torch.Tensor:
    """L = −(2/β)·mean_i log σ(β·[(logπ_θ − logπ_ref)(ỹ_i) − (logπ_θ − logπ_ref)(y_i)]): DPO preferring an
    alternative answer ỹ that the target itself wrote over the true answer y (open-unlearning's DPO with
    the alternate as the winner; β = 0.1, α = 1 as its DPO.yaml).

    The alternatives (`data/alternatives.py`) are made once before training: with `instruct` (default: when
    the tokenizer has a chat template) the target rewrites the answer on instruction, as in the paper;
    otherwise it is asked the question and sampled (`tries` times at `temperature`) until it answers
    something else. Each is (B,): `forget` the true answers, `alt` the alternatives.
    """
    if forget.ref_logp is None or alt.ref_logp is None:
        raise ValueError("altpo needs reference log-probs of both the true and the alternative answers")
    margin = (alt.logp - alt.ref_logp) - (forget.logp - forget.ref_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
