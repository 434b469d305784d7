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

from collections.abc import Mapping
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


@dataclass(frozen=True)
class AnswerTokens:
    """The model's logits at the positions that predict answer tokens, for per-token losses.

    Attributes:
        logits: (M, V), one row per answer token of the micro-batch, sequences in order.
        targets: (M,) the answer token each row predicts. owner: (M,) its sequence, 0..size-1.
        size: the number of sequences B.
        norm: () the step normaliser of token means (see the module docstring); None: M.
        step_counts: (G,) the answer-token count of every sequence of the optimizer step, and
        micro_batches: how many micro-batches share the step; with both, `count_from` gives the step
            normaliser of a mean over the tokens from the n-th of each answer on. None outside training.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    size: int
    norm: torch.Tensor | None = None
    step_counts: torch.Tensor | None = None
    micro_batches: int | None = None

    def logp(self) -> torch.Tensor:
        """(M,) float32 log-prob of each answer token."""
        return -F.cross_entropy(self.logits.float(), self.targets, reduction="none")

    def sequences(self, logp: torch.Tensor | None = None) -> SequenceLogProbs:
        """Per-sequence sums of `logp` (M,) (default: the token log-probs) and answer lengths."""
        logp = self.logp() if logp is None else logp
        sums = torch.zeros(self.size, dtype=logp.dtype, device=logp.device).index_add(0, self.owner, logp)
        counts = torch.bincount(self.owner, minlength=self.size).to(logp.dtype)
        return SequenceLogProbs(sums, counts, norm=self.norm)

    def sequence_means(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) the mean of per-token `values` (M,) over each sequence's answer tokens."""
        seq = self.sequences(values)
        return seq.logp / seq.ntokens.clamp(min=1)

    def kl_from(self, fixed: AnswerTokens) -> torch.Tensor:
        """(M,) KL(p_fixed ‖ p_self) of the next-token distributions at each answer position, `fixed` the
        logits of another model at the same positions of the same micro-batch (detached: it does not train)."""
        if fixed.logits.shape != self.logits.shape:
            raise ValueError(f"answer positions differ: {tuple(fixed.logits.shape)} vs {tuple(self.logits.shape)}")
        return kl_rows(fixed.logits.detach(), self.logits)

    def mean(self, values: torch.Tensor, keep: torch.Tensor | None = None, norm: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Σ values / norm over the answer tokens (those in `keep`, (M,) bool, if given), a scalar.

        `norm` defaults to the step normaliser, else the number of tokens counted."""
        if keep is not None:
            values = values[keep]
        denom = norm if norm is not None else self.norm
        if denom is None:
            denom = torch.tensor(max(values.numel(), 1), dtype=values.dtype, device=values.device)
        return values.sum() / denom

    def position(self) -> torch.Tensor:
        """(M,) each token's index within its answer: 0 for the first answer token of each sequence."""
        counts = torch.bincount(self.owner, minlength=self.size)
        starts = torch.cumsum(counts, 0) - counts
        return torch.arange(self.owner.numel(), device=self.owner.device) - starts[self.owner]

    def count_from(self, n: int) -> torch.Tensor | None:
        """The step normaliser of a token mean that skips the first `n` tokens of every answer."""
        if self.step_counts is None or not self.micro_batches:
            return None
        return (self.step_counts - n).clamp(min=0).sum() / self.micro_batches


def layout_tokens(logits: torch.Tensor, layout: AnswerLayout, batch: Mapping[str, Any] | None = None
                  ) -> AnswerTokens:
    """The `AnswerTokens` of the kept logits (M, V), with the step normalisers a training batch carries."""
    batch = batch or {}
    micro = batch.get("micro_batches")
    return AnswerTokens(logits, layout.targets, layout.owner, layout.size, batch.get("answer_norm"),
                        batch.get("step_answer_tokens"), None if micro is None else int(micro))


@dataclass(frozen=True)
class PositionLogits:
    """A model's logits at every position of a micro-batch, for losses over whole next-token distributions.

    Attributes:
        logits: (B, T, V). attention_mask: (B, T), 1 for real tokens.
        norm: () the step normaliser of means over positions (`position_norm`); None: this batch's count.
    """

    logits: torch.Tensor
    attention_mask: torch.Tensor
    norm: torch.Tensor | None = None


@dataclass(frozen=True)
class HiddenStates:
    """The output of one named module (a decoder layer) on a micro-batch.

    Attributes:
        states: (B, T, D). mask: (B, T) bool, the answer tokens' positions (labels that count).
    """

    states: torch.Tensor
    mask: torch.Tensor

    def mean_squared_distance(self, other: torch.Tensor) -> torch.Tensor:
        """mean_b [Σ_t∈answer mean_d (h − other)² / |answer_b|]: the activation distance of RMU, a scalar.

        `other` broadcasts against the states ((B, T, D), or (1, 1, D) for a steering vector)."""
        diff = (self.states.float() - other.float()).pow(2).mean(-1)  # (B, T)
        mask = self.mask.to(diff.dtype)
        per_sequence = (diff * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.mean()


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
    kl = kl_rows(ref_logits[:, :-1], logits[:, :-1])  # (B, T-1)
    return (kl * mask).sum() / (mask.sum().clamp(min=1) if norm is None else norm)


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of the distributions softmax(p_logits) and softmax(q_logits) along the last axis, in float32:
    (..., V), (..., V) -> (...)."""
    p = F.log_softmax(p_logits.float(), dim=-1)
    return (p.exp() * (p - F.log_softmax(q_logits.float(), dim=-1))).sum(-1)


def answer_token_count(labels: list[int]) -> int:
    """Answer tokens of one encoded example that a loss scores (labels after the shift)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)
