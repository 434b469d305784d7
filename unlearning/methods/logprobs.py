"""The only place that shifts labels, masks prompt/padding tokens and gathers token log-probs.

Conventions: `labels` are the input ids with every position that is not an answer token set to
`IGNORE_INDEX` (-100); position t's logits predict token t+1. Every loss and metric goes through here.

Token means take an optional `norm`, the denominator to divide by instead of this micro-batch's own
count. The training sampler sets it to the whole optimizer step's count divided by the number of
micro-batches in the step (ranks × accumulation), so that averaging gradients over ranks and
micro-batches yields the token mean of the global batch, whatever the split: a step's maths does not
depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceLogProbs:
    """Per-sequence answer log-likelihoods.

    Attributes:
        logp: (B,) summed log-prob of the answer tokens under the model being trained.
        ntokens: (B,) number of answer tokens (float, for division).
        ref_logp: (B,) the same under the reference model (e.g. cached before training), or None.
        norm: () denominator of `token_mean` (see the module docstring); None: Σ ntokens.
    """

    logp: torch.Tensor
    ntokens: torch.Tensor
    ref_logp: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    def with_ref(self, ref_logp: torch.Tensor) -> SequenceLogProbs:
        return SequenceLogProbs(self.logp, self.ntokens, ref_logp.to(self.logp), self.norm)

    def with_norm(self, norm: torch.Tensor | None) -> SequenceLogProbs:
        return SequenceLogProbs(self.logp, self.ntokens, self.ref_logp, norm)

    def token_mean(self) -> torch.Tensor:
        """Σ logp / Σ ntokens (or / norm): the mean answer-token log-prob, a scalar."""
        denom = self.ntokens.sum().clamp(min=1) if self.norm is None else self.norm
        return self.logp.sum() / denom


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and a mask of the positions that count.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) targets, `IGNORE_INDEX` where masked.

    Returns:
        logp (B, T-1) in float32, zero where masked; mask (B, T-1) bool.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll * mask, mask


def answer_distributions(logits: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next-token log-distributions at the positions that predict an answer token, and nothing else
    (prompt and padding positions are skipped before the softmax, not masked after it).

    Args:
        logits: (B, T, V). labels: (B, T), `IGNORE_INDEX` off the answer.

    Returns:
        dist (M, V) float32 log-probs, targets (M,) the answer tokens they predict, counts (B,) how many
        of the M rows belong to each sequence (rows are in sequence order).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # (B, T-1)
    dist = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (M, V)
    return dist, targets[mask], mask.sum(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogProbs:
    """Summed answer log-prob and answer length of each sequence; (B, T, V), (B, T) -> (B,), (B,)."""
    logp, mask = token_logprobs(logits, labels)
    return SequenceLogProbs(logp.sum(-1), mask.sum(-1).float())


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over every answer token of the batch (or Σ NLL / norm), a scalar."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / (mask.sum().clamp(min=1) if norm is None else norm)


def token_kl(
    ref_logits: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor, norm: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) of the next-token distributions, averaged over real (non-pad) positions.

    Args:
        ref_logits, logits: (B, T, V). attention_mask: (B, T), 1 for real tokens.
        norm: denominator instead of Σ_t m_t (see the module docstring).

    Returns:
        A scalar: Σ_t KL_t · m_t / Σ_t m_t, where m_t marks positions whose next token is real.
    """
    mask = attention_mask[:, 1:].bool()  # (B, T-1): position t predicts a real token t+1
    ref = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    cur = F.log_softmax(logits[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - cur)).sum(-1)  # (B, T-1)
    return (kl * mask).sum() / (mask.sum().clamp(min=1) if norm is None else norm)


def answer_token_count(labels: list[int]) -> int:
    """Answer tokens of one encoded example that a loss scores (labels after the shift)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)
