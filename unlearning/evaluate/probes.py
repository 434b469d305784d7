"""Probes: run a model over encoded sequences and return per-example arrays, batched by length.

Two kinds of probe, each batched over length-sorted inputs and returning results in input order:

- `score`: teacher-forced pass over (prompt + answer) sequences. Per sequence: the summed answer
  log-prob and answer length, and per answer token its log-prob, whether the argmax prediction equals it
  (extraction strength, exact memorization) and the mean and standard deviation of log p under the
  model's own next-token distribution at that position (Min-K%++).
- `generate`: greedy continuations of prompts (left-padded batches), decoded up to EOS.

A split of text chunks (`data/text.py`) has no questions: its chunks are scored whole, and each chunk's prefix
is continued greedily for VerbMem.

`probe_split` builds every sequence an evaluation split needs (answer, paraphrased answer, perturbed
answers, answer to the paraphrased question), scores each distinct sequence once, and bundles the
results as a `SplitProbes` that every metric reads.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unlearning.data.encoders import QAEncoder
from unlearning.data.loaders import is_choice
from unlearning.data.text import is_text
from unlearning.data.tokenize import collate
from unlearning.methods.answers import answer_logprobs_of, kept_logits
from unlearning.methods.logprobs import IGNORE_INDEX, answer_layout


@dataclass(frozen=True)
class Scores:
    """Teacher-forced scores of N sequences (answer tokens only; n_i answer tokens in sequence i).

    Attributes:
        logp: (N,) summed answer log-prob, float64.
        ntokens: (N,) answer token counts, int64.
        token_logp: N arrays (n_i,): log p of each answer token.
        token_mu, token_sigma: N arrays (n_i,): mean and std of log p under the next-token distribution.
        argmax_ok: N bool arrays (n_i,): the teacher-forced argmax equals the answer token.
        last_eos: (N,) bool: the last answer token is the EOS the encoder appends (False only where the
            answer was cut at `data.max_length`).
    """

    logp: np.ndarray
    ntokens: np.ndarray
    token_logp: list[np.ndarray]
    token_mu: list[np.ndarray]
    token_sigma: list[np.ndarray]
    argmax_ok: list[np.ndarray]
    last_eos: np.ndarray

    def take(self, idx: Sequence[int]) -> Scores:
        """The scores of sequences `idx`, in that order."""
        return Scores(self.logp[list(idx)], self.ntokens[list(idx)], [self.token_logp[i] for i in idx],
                      [self.token_mu[i] for i in idx], [self.token_sigma[i] for i in idx],
                      [self.argmax_ok[i] for i in idx], self.last_eos[list(idx)])

    def without_eos(self, name: str) -> list[np.ndarray]:
        """The per-token arrays `name` (token_logp, token_mu, token_sigma, argmax_ok) without the final EOS
        position: the answer's own tokens, which open-unlearning's memorisation and Min-K metrics score."""
        return [a[:-1] if eos else a for a, eos in zip(getattr(self, name), self.last_eos, strict=True)]

    def probability(self) -> np.ndarray:
        """(N,) length-normalised answer probability p = exp(logπ(y|x) / |y|)."""
        return np.exp(self.logp / np.maximum(self.ntokens, 1))


def _batch_token_stats(logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor
                      ) -> list[tuple[np.ndarray, ...]]:
    """Per-sequence (token log-p, μ, σ, argmax match) over the answer positions of one batch.

    Args:
        logits: (M, V) at the M positions that predict an answer token, in sequence order; targets: (M,) the
            tokens they predict; counts: (B,) how many of the M belong to each sequence.
    """
    dist = F.log_softmax(logits.float(), dim=-1)
    logp = dist.gather(-1, targets[:, None])[:, 0]
    probs = dist.exp()
    mu = (probs * dist).sum(-1)  # (M,)
    sigma = (probs * (dist - mu[:, None]).square()).sum(-1).sqrt()  # two-pass: E[x²] − μ² cancels badly in fp32
    ok = dist.argmax(-1) == targets
    columns = [t.cpu().numpy() for t in (logp.double(), mu.double(), sigma.double(), ok)]
    return list(zip(*(np.split(c, np.cumsum(counts.tolist())[:-1]) for c in columns), strict=True))


def answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits (M, V) of the positions that predict an answer token only, with their targets (M,) and the
    count per sequence (B,): the vocabulary projection and softmax skip the prompt and padding (`kept_logits`,
    the training path's)."""
    layout = answer_layout(batch, pack=False)
    return kept_logits(model, layout), layout.targets, torch.bincount(layout.owner, minlength=layout.size)


def _progress(total: int, desc: str, show: bool | None) -> Any:
    return tqdm(total=total, desc=desc, leave=False, disable=not (sys.stderr.isatty() if show is None else show))


@torch.inference_mode()
def score(model: Any, rows: Sequence[dict[str, Any]], *, pad_id: int, eos_id: int | None, batch_size: int = 32,
          show_progress: bool | None = None) -> Scores:
    """Teacher-forced `Scores` of encoded rows (`input_ids`, `labels`), in batches of similar length."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    per_row: list[tuple[np.ndarray, ...]] = [()] * len(rows)
    with _progress(len(rows), "score", show_progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            for i, stats in zip(idx, _batch_token_stats(*answer_logits(model, batch)), strict=True):
                per_row[i] = stats
            bar.update(len(idx))
    token_logp, mu, sigma, ok = (list(col) for col in zip(*per_row, strict=True)) if rows else ([], [], [], [])
    return Scores(np.array([t.sum() for t in token_logp], dtype=np.float64),
                  np.array([len(t) for t in token_logp], dtype=np.int64), token_logp, mu, sigma, ok,
                  ends_with_eos(rows, eos_id))


def ends_with_eos(rows: Sequence[dict[str, Any]], eos_id: int | None) -> np.ndarray:
    """(N,) whether each row's last label is the EOS token (rows are unpadded, so it is the last answer token)."""
    return np.array([eos_id is not None and bool(r["labels"]) and r["labels"][-1] == eos_id for r in rows],
                    dtype=bool)


@torch.inference_mode()
def generate(model: Any, prompts: Sequence[list[int]], tokenizer: Any, *, max_new_tokens: int,
             batch_size: int = 32, show_progress: bool | None = None) -> list[str]:
    """Greedy continuation of each prompt (token ids), decoded without special tokens, in input order."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    with _progress(len(prompts), "generate", show_progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(idx, gen[:, width:].tolist(), strict=True):
                out[i] = decode_until_eos(tokenizer, row)
            bar.update(len(idx))
    return out


def decode_until_eos(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class SplitProbes:
    """Everything the metrics read about one evaluation split of N items (P perturbed answers each).

    Attributes:
        answer: scores of the answer given the question.
        answers: the answer texts (references for ROUGE and KnowMem).
        generation: greedy answers to the questions.
        paraphrased: scores of the paraphrased answer given the question, or None without paraphrases.
        perturbed: P scores of the perturbed (wrong) answers given the question, or None.
        para_question: scores of the answer given the paraphrased question, or None.
        para_generation: greedy answers to the paraphrased questions, or None.
        label_texts: the labelled tokens of each answer decoded without special tokens, as the template
            renders them (" Drulzeath."): the text ZLib compresses, as open-unlearning does.
        continuations: on a split of text chunks (no questions), the greedy continuation of each chunk's first
            `eval.verbmem_prefix` tokens (VerbMem), else None; references: what the chunk itself continues
            with, as many tokens as are generated (up to a document's EOS), "" where the chunk is too short.
        choices, answer_index: on a multiple-choice split, each item's options in their order and the right one's
            index (`answer` scores the right option, `perturbed` the others in order), else None.
    """

    answer: Scores
    answers: list[str]
    generation: list[str]
    paraphrased: Scores | None = None
    perturbed: list[Scores] | None = None
    para_question: Scores | None = None
    para_generation: list[str] | None = None
    label_texts: list[str] | None = None
    continuations: list[str] | None = None
    references: list[str] | None = None
    choices: list[list[str]] | None = None
    answer_index: list[int] | None = None

    def __len__(self) -> int:
        return len(self.answers)


def split_requests(rows: Sequence[dict[str, Any]], encoder: QAEncoder
                   ) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """The distinct sequences a split needs scored (each encoded by `encoder`, named by its row), and where each
    request finds its sequence.

    Returns:
        (sequences, plan): plan maps "answer", "paraphrased", "para_question" to (N,) indices into
        sequences (None when the split lacks that field) and "perturbed" to P such lists.
    """
    has = {f: bool(rows) and all(r.get(f) for r in rows)
           for f in ("paraphrased_answer", "perturbed_answer", "paraphrased_question")}
    groups: dict[str, list[tuple[int, str, str]]] = {}  # request -> (row, question, answer) per row
    if has["paraphrased_answer"]:
        groups["paraphrased"] = [(i, r["question"], r["paraphrased_answer"]) for i, r in enumerate(rows)]
    if has["paraphrased_question"]:
        groups["para_question"] = [(i, r["paraphrased_question"], r["answer"]) for i, r in enumerate(rows)]
    n_perturbed = min(len(r["perturbed_answer"]) for r in rows) if has["perturbed_answer"] else 0
    for j in range(n_perturbed):  # a common count keeps the (N, P) arrays rectangular
        groups[f"perturbed{j}"] = [(i, r["question"], r["perturbed_answer"][j]) for i, r in enumerate(rows)]
    encoded = iter(encoder.qa_many([item for g in groups.values() for item in g]))

    seqs: list[dict[str, list[int]]] = []
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

    def add(enc: dict[str, list[int]]) -> int:
        key = (tuple(enc["input_ids"]), tuple(enc["labels"]))
        if key not in seen:
            seen[key] = len(seqs)
            seqs.append(enc)
        return seen[key]

    plan: dict[str, Any] = {"answer": [add(encoder.answer_row(i, r)) for i, r in enumerate(rows)]}
    for name, items in groups.items():
        plan[name] = [add(next(encoded)) for _ in items]
    plan.setdefault("paraphrased", None)
    plan.setdefault("para_question", None)
    plan["perturbed"] = [plan.pop(f"perturbed{j}") for j in range(n_perturbed)] or None
    return seqs, plan


def probe_split(model: Any, rows: Sequence[dict[str, Any]], encoder: QAEncoder, *, batch_size: int,
                max_new_tokens: int, generations: bool = True, show_progress: bool | None = None,
                verbmem_prefix: int = 32) -> SplitProbes:
    """Run every probe of one split, each sequence and prompt from `encoder`: one scoring pass over its distinct
    sequences, then generation (on a split of text chunks: the continuations of VerbMem)."""
    tokenizer = encoder.tokenizer
    seqs, plan = split_requests(rows, encoder)
    scores = score(model, seqs, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, batch_size=batch_size,
                   show_progress=show_progress)
    if is_text(rows):
        continued = [list(r["input_ids"]) for r in rows]
        references = [decode_until_eos(tokenizer, ids[verbmem_prefix:verbmem_prefix + max_new_tokens])
                      for ids in continued]
        return SplitProbes(
            answer=scores.take(plan["answer"]), answers=[r["answer"] for r in rows], generation=[],
            label_texts=label_texts(tokenizer, [seqs[i] for i in plan["answer"]]),
            continuations=generate(model, [ids[:verbmem_prefix] for ids in continued], tokenizer,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   show_progress=show_progress) if generations else None,
            references=references if generations else None)

    def gen(field: str) -> list[str]:
        prompts = encoder.prompts([(i, r[field], r["answer"]) for i, r in enumerate(rows)])
        return generate(model, prompts, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        show_progress=show_progress)

    para_q = plan["para_question"] is not None
    choice = is_choice(rows)  # multiple choice: the options' likelihoods are the probe, nothing is generated
    generations = generations and not choice
    return SplitProbes(
        answer=scores.take(plan["answer"]),
        answers=[r["answer"] for r in rows],
        generation=gen("question") if generations else [],
        paraphrased=scores.take(plan["paraphrased"]) if plan["paraphrased"] is not None else None,
        perturbed=[scores.take(ix) for ix in plan["perturbed"]] if plan["perturbed"] is not None else None,
        para_question=scores.take(plan["para_question"]) if para_q else None,
        para_generation=gen("paraphrased_question") if generations and para_q else None,
        label_texts=label_texts(tokenizer, [seqs[i] for i in plan["answer"]]),
        choices=[list(r["choices"]) for r in rows] if choice else None,
        answer_index=[int(r["answer_index"]) for r in rows] if choice else None,
    )


def label_texts(tokenizer: Any, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each row's labelled tokens decoded with special tokens skipped (open-unlearning's
    `extract_target_texts_from_processed_data`, src/evals/metrics/utils.py)."""
    return tokenizer.batch_decode([[t for t in r["labels"] if t != IGNORE_INDEX] for r in rows],
                                  skip_special_tokens=True)


@torch.no_grad()
def answer_logprobs(model: Any, rows: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int = 32,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer log-prob and answer length of every row (rows hold `input_ids` and `labels`): the
    light probe behind training's probability checks, without `score`'s per-token statistics.

    Returns:
        logp (N,) float64 and ntokens (N,) int64.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    logp, ntok = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
        seq = answer_logprobs_of(model, batch)
        logp[idx] = seq.logp.double().cpu().numpy()
        ntok[idx] = seq.ntokens.long().cpu().numpy()
    return logp, ntok


def normalised_probability(logp: np.ndarray, ntokens: np.ndarray) -> np.ndarray:
    """Per-example p = exp(logπ(y|x) / |y|), the length-normalised answer probability."""
    return np.exp(logp / np.maximum(ntokens, 1))
