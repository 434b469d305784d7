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
from typing import Any

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


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogProbs:
    """Summed answer log-prob and answer length of each sequence; (B, T, V), (B, T) -> (B,), (B,)."""
    logp, mask = token_logprobs(logits, labels)
    return SequenceLogProbs(logp.sum(-1), mask.sum(-1).float())


@dataclass(frozen=True)
class AnswerLayout:
    """A micro-batch arranged so that the model computes only the logits that score answer tokens.

    Attributes:
        inputs: the model call's keyword arguments: `input_ids` and `attention_mask` (B, T) as collated,
            or, packed, `input_ids` and `position_ids` (1, N) and `use_cache=False`: every sequence back to
            back without padding, positions restarting at 0 for each, which keeps them apart in attention.
        keep: bool mask over the input positions, (B, T) or (1, N): those whose next token is an answer
            token; the model's `logits_to_keep` projects only these, to logits (M, V) in row-major order.
        targets: (M,) the answer token each kept position predicts.
        owner: (M,) the sequence (0..B-1) each of them belongs to.
        size: B, the number of sequences.
    """

    inputs: dict[str, Any]
    keep: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    size: int


def answer_layout(batch: dict[str, torch.Tensor], *, pack: bool) -> AnswerLayout:
    """The `AnswerLayout` of a collated micro-batch (`input_ids`, `labels`, `attention_mask`, (B, T))."""
    ids, labels, real = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    size = ids.shape[0]
    predicts = torch.zeros_like(real)
    predicts[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & real[:, :-1]  # position t scores token t+1
    targets = labels[:, 1:][predicts[:, :-1]]
    owner = torch.arange(size, device=ids.device)[:, None].expand_as(real)[predicts]
    if not pack:
        return AnswerLayout({"input_ids": ids, "attention_mask": batch["attention_mask"]}, predicts, targets, owner,
                            size)
    positions = real.long().cumsum(1) - 1
    # No cache either: transformers only reads packed sequences from the position ids without one.
    inputs: dict[str, Any] = {"input_ids": ids[real][None], "position_ids": positions[real][None], "use_cache": False}
    return AnswerLayout(inputs, predicts[real][None], targets, owner, size)


def packing_pays(lengths: list[int], hidden_size: int) -> bool:
    """Whether packing a micro-batch of these sequence lengths saves work over padding it.

    Packing drops the padding from every linear layer (≈ 24·h² flops per token and layer) but attends
    over the whole packed row (≈ 4·h per query-key pair, with the other sequences masked, not skipped).
    """
    n, padded = sum(lengths), len(lengths) * max(lengths)
    per_token = 6 * hidden_size  # both costs divided by 4·h
    return n * per_token + n * n < padded * per_token + len(lengths) * max(lengths) ** 2


def layout_logprobs(logits: torch.Tensor, layout: AnswerLayout) -> SequenceLogProbs:
    """Summed answer log-prob and answer length of each sequence from the kept logits (M, V)."""
    logp = -F.cross_entropy(logits.float(), layout.targets, reduction="none")  # (M,)
    sums = torch.zeros(layout.size, dtype=logp.dtype, device=logp.device).index_add(0, layout.owner, logp)
    counts = torch.bincount(layout.owner, minlength=layout.size).to(logp.dtype)
    return SequenceLogProbs(sums, counts)


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
