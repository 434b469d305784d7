"""What an evaluation scores: a subject, a checkpoint and, for an in-context method, the prompt policy applied
to every question asked of it.

A subject has an identity (the eval cache's key: the checkpoint's, and the method's parameters and seed), a
model to load and an encoder per split (`data/encoders.py`): the template alone for a checkpoint, each
question after its `Context` for an in-context method (`methods/icul.py`, `methods/instruct.py`). The contexts
are drawn once per evaluated row from the seed, so every metric of a split scores the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.data.context import Context
from unlearning.data.encoders import ContextEncoder, QAEncoder
from unlearning.hashing import content_hash
from unlearning.methods import METHODS
from unlearning.models import model_identity
from unlearning.schema import ExperimentConfig, MethodConfig


@dataclass(frozen=True)
class Subject:
    """A checkpoint, evaluated as it is (`method` None) or under an in-context method's prompts."""

    path: Path
    method: MethodConfig | None = None
    seed: int = 0

    @property
    def identity(self) -> str:
        weights = model_identity(self.path)
        if self.method is None:
            return weights
        return content_hash("in-context", weights, self.method.model_dump(), self.seed)

    def describe(self) -> dict[str, Any] | None:
        """The in-context method as eval.json records it (None for a checkpoint alone)."""
        return None if self.method is None else {"method": self.method.model_dump(), "seed": self.seed}

    def encoders(self, rows: Mapping[str, Sequence[dict[str, Any]]], data: Any, tokenizer: Any,
                 cfg: ExperimentConfig, window: int) -> dict[str, QAEncoder]:
        """Split → the encoder of its evaluated `rows` (`data`: every prepared split, which the contexts draw
        from); `window`: the most tokens context, question and answer may take."""
        if self.method is None:
            return {s: QAEncoder(tokenizer, cfg.data.template, cfg.data.max_length) for s in rows}
        forget, retain = list(data["forget"]), list(data["retain"])
        return {s: ContextEncoder(tokenizer, cfg.data.template, window,
                                  contexts(self.method, self.seed, s, r, forget, retain)) for s, r in rows.items()}


def contexts(method: MethodConfig, seed: int, split: str, rows: Sequence[dict[str, Any]],
             forget: Sequence[dict[str, Any]], retain: Sequence[dict[str, Any]]) -> list[Context]:
    """The context of each of a split's evaluated rows under an in-context method: for a forget row, built
    around that row (the item being unlearned); for any other, around a forget row drawn from the seed."""
    policy = METHODS.get(method.name).fn
    out = []
    for i, row in enumerate(rows):
        rng = random.Random(content_hash(seed, method.name, split, i, row["question"]))
        forget_row = row if split == "forget" else rng.choice(forget)
        out.append(policy(row, forget_row, retain, rng, **method.params))  # params checked at load
    return out
