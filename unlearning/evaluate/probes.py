"""Probes: run a model over encoded examples and return per-example arrays, batched by length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unlearning.data.tokenize import collate
from unlearning.methods.logprobs import sequence_logprobs


@torch.no_grad()
def answer_logprobs(model: Any, rows: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int = 32,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer log-prob and answer length of every row (rows hold `input_ids` and `labels`).

    Rows are sorted by length so each batch pads little; results come back in the input order.

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
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        seq = sequence_logprobs(out.logits, batch["labels"])
        logp[idx] = seq.logp.double().cpu().numpy()
        ntok[idx] = seq.ntokens.long().cpu().numpy()
    return logp, ntok


def normalised_probability(logp: np.ndarray, ntokens: np.ndarray) -> np.ndarray:
    """Per-example p = exp(logπ(y|x) / |y|), the length-normalised answer probability."""
    return np.exp(logp / np.maximum(ntokens, 1))
