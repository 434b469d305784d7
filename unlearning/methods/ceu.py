"""CE-U, cross-entropy unlearning (Yang et al. 2025, arXiv:2503.01224)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import AnswerTokens


@METHODS.register("ceu", gamma=1.0, alpha=0.0, retain_loss="none")
def ceu(forget_tokens: AnswerTokens, *, ignore_first_n_answer_tokens: int = 1) -> torch.Tensor:
    """L = mean_t CE(p_θ, q_t), q_t = softmax of the model's own logits with the true token's set to −∞
    (detached): the model is pulled toward its distribution over every other token, a bounded loss.

    The first n tokens of each answer are left out (the paper's footnote; open-unlearning's default 1),
    and the mean runs over the rest of the step's answer tokens.
    """
    keep = forget_tokens.position() >= ignore_first_n_answer_tokens
    logits = forget_tokens.logits.float()[keep]
    target = logits.detach().scatter(-1, forget_tokens.targets[keep][:, None], float("-inf")).softmax(-1)
    ce = -(target * F.log_softmax(logits, -1)).sum(-1)
    return forget_tokens.mean(ce, norm=forget_tokens.count_from(ignore_first_n_answer_tokens))
