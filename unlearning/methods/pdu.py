"""PDU, primal-dual unlearning (Entesari et al. 2025, "Constrained entropic unlearning"): forget while a
constraint keeps the retain loss under ε, its weight a dual variable raised while the constraint is broken."""

from __future__ import annotations

from typing import Any

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import AnswerTokens


def dual_update(weight: float, record: dict[str, float], *, epoch: float, retain_loss_eps: float,
                dual_step_size: float, dual_warmup_epochs: float, primal_dual: bool, **_: Any) -> float:
    """The retain weight after an optimizer step: λ ← max(0, λ + η·(retain_loss − ε)), from the step's
    retain loss averaged over the ranks (so every rank holds the same λ), once `dual_warmup_epochs` epochs
    of the forget set are done. open-unlearning updates it on each micro-batch with that rank's own loss."""
    if not primal_dual or epoch < dual_warmup_epochs:
        return weight
    return max(0.0, weight + dual_step_size * (record["retain_loss"] - retain_loss_eps))


@METHODS.register("pdu", gamma=1.0, alpha=1.0, retain_loss="nll", dual=dual_update)
def pdu(forget_tokens: AnswerTokens, *, retain_loss_eps: float, dual_step_size: float = 1.0,
        dual_warmup_epochs: float = 5.0, primal_dual: bool = True) -> torch.Tensor:
    """L = mean_t (max_v z_t,v − mean_v z_t,v)² over the forget answer positions: the logits flattened
    toward uniform (open-unlearning's PDU forget loss, scored at the positions that predict answer tokens);
    the objective adds λ·retain_loss with λ = alpha at the start, then `dual_update` after each step.

    The total loss leaves out the constant −λ·ε of the Lagrangian: the gradients are the same.
    """
    z = forget_tokens.logits.float()
    return forget_tokens.mean((z.max(-1).values - z.mean(-1)) ** 2)
