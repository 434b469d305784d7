"""Per-example probes: one unpadded forward or generate call per sequence, written as plainly as possible.

This is what an evaluation loop looks like without batching: the reference the batched probes are tested
against (tests/integration/test_eval.py) and the baseline of bench/bench_eval.py. It shares no code with
`probes.py` beyond the tokenizer's encoding and the `Scores` bundle, so that the equivalence test compares
two implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unlearning.data.tokenize import encode_prompt, encode_qa
from unlearning.evaluate.probes import Scores, SplitProbes


@torch.no_grad()
def score_one(model: Any, input_ids: list[int], labels: list[int]) -> tuple[np.ndarray, ...]:
    """(token log-p, μ, σ, argmax match) over the answer tokens of one unpadded sequence."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([input_ids], device=device)).logits[0, :-1].float()  # (T-1, V)
    targets = torch.tensor(labels[1:], device=device)  # position t predicts token t+1
    keep = targets != -100
    dist = torch.log_softmax(logits[keep], dim=-1)  # (n, V)
    answer = targets[keep]
    token_logp = dist.gather(-1, answer[:, None])[:, 0]
    mu = (dist.exp() * dist).sum(-1)
    sigma = (dist.exp() * (dist - mu[:, None]) ** 2).sum(-1).sqrt()
    return (token_logp.double().cpu().numpy(), mu.double().cpu().numpy(), sigma.double().cpu().numpy(),
            (dist.argmax(-1) == answer).cpu().numpy())


def score_each(model: Any, rows: Sequence[dict[str, Any]], eos_id: int) -> Scores:
    per = [score_one(model, list(r["input_ids"]), list(r["labels"])) for r in rows]
    return Scores(np.array([p[0].sum() for p in per]), np.array([len(p[0]) for p in per]), [p[0] for p in per],
                  [p[1] for p in per], [p[2] for p in per], [p[3] for p in per],
                  np.array([r["labels"][-1] == eos_id for r in rows]))


@torch.no_grad()
def generate_one(model: Any, prompt: list[int], tokenizer: Any, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, len(prompt):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def probe_split_naive(model: Any, rows: Sequence[dict[str, Any]], tokenizer: Any, template: Any, *,
                      max_length: int, max_new_tokens: int, generations: bool = True) -> SplitProbes:
    """`probes.probe_split`, one example and one sequence at a time (no batching, no deduplication)."""
    def enc(q: str, a: str) -> dict[str, list[int]]:
        return encode_qa(tokenizer, template, q, a, max_length)

    def gen(q: str) -> str:
        return generate_one(model, encode_prompt(tokenizer, template, q), tokenizer, max_new_tokens)

    n_pert = min(len(r["perturbed_answer"]) for r in rows)
    eos = tokenizer.eos_token_id
    return SplitProbes(
        answer=score_each(model, rows, eos),
        answers=[r["answer"] for r in rows],
        generation=[gen(r["question"]) for r in rows] if generations else [],
        paraphrased=score_each(model, [enc(r["question"], r["paraphrased_answer"]) for r in rows], eos),
        perturbed=[score_each(model, [enc(r["question"], r["perturbed_answer"][j]) for r in rows], eos)
                   for j in range(n_pert)],
        para_question=score_each(model, [enc(r["paraphrased_question"], r["answer"]) for r in rows], eos),
        para_generation=[gen(r["paraphrased_question"]) for r in rows] if generations else None,
        label_texts=[tokenizer.decode([t for t in r["labels"] if t != -100], skip_special_tokens=True) for r in rows],
    )
