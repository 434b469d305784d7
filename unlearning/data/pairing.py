"""Forget/refusal pairing for preference-style methods (IdkDPO).

Each forget question is paired with a refusal, chosen deterministically from the seed and the item's
position, and encoded through the same template as the true answer, so the two answers of a pair
share the prompt and differ only in the answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearning.data.refusals import REFUSALS, refusal
from unlearning.data.tokenize import encode_qa
from unlearning.schema import Template

__all__ = ["REFUSALS", "refusal", "refusal_rows"]


def refusal_rows(tokenizer: Any, template: Template, forget: Sequence[dict[str, Any]], *, seed: int,
                 max_length: int) -> list[dict[str, Any]]:
    """Encoded (question, refusal) pairs, one per forget row, in the same order."""
    return [encode_qa(tokenizer, template, row["question"], refusal(seed, i), max_length)
            for i, row in enumerate(forget)]
