"""Fine-tuning on the forget set: the step that makes the forget task vector τ = θ_ft − θ_target."""

from __future__ import annotations

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import SequenceLogProbs


@METHODS.register("finetune", gamma=1.0, alpha=0.0, retain_loss="none")
def finetune(forget: SequenceLogProbs) -> torch.Tensor:
    """Mean token NLL of the forget answers (plain descent: learns the forget set further). Not an
    unlearning method by itself; the merge stage negates the weight change it causes."""
    return -forget.token_mean()
