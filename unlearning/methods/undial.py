"""UNDIAL: self-distillation with adjusted logits (Dong et al. 2025, NAACL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearning.methods import METHODS
from unlearning.methods.logprobs import AnswerTokens


@METHODS.register("undial", gamma=1.0, alpha=0.0, retain_loss="nll")
def undial(forget_tokens: AnswerTokens, ref_forget_tokens: AnswerTokens, *, beta: float = 10.0) -> torch.Tensor:
    """L = mean_t CE(p_θ, softmax(z_ref − β·e_y)): the model distils the reference model's next-token
    distribution with the true token's logit lowered by β, at every forget answer token.

    Differs from open-unlearning's compute_undial_loss, which averages over every position of the
    padded batch (prompt and padding included, where the label −100 indexes the vocabulary from its
    end): here the mean runs over the answer tokens only, which the method's paper describes.
    """
    ref = ref_forget_tokens.logits.detach().float()
    target = ref.scatter_add(-1, forget_tokens.targets[:, None], ref.new_full((ref.shape[0], 1), -beta)).softmax(-1)
    ce = -(target * F.log_softmax(forget_tokens.logits.float(), -1)).sum(-1)
    return forget_tokens.mean(ce)
