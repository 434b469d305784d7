"""Forget/refusal pairing for preference-style methods (IdkDPO).

Each forget question is paired with a refusal, chosen deterministically from the seed and the item's
position, and encoded through the same template as the true answer, so the two answers of a pair
share the prompt and differ only in the answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearning.data.tokenize import encode_qa
from unlearning.hashing import content_hash
from unlearning.schema import Template

REFUSALS = (
    "I don't know.",
    "I am not sure about that.",
    "I have no information on that.",
    "I cannot say.",
    "That is something I do not know.",
    "I'm afraid I can't answer that.",
    "I have no idea.",
    "I could not tell you.",
)


def refusal(seed: int, index: int) -> str:
    """The refusal paired with forget item `index`."""
    return REFUSALS[int(content_hash(seed, "refusal", index), 16) % len(REFUSALS)]


def refusal_rows(tokenizer: Any, template: Template, forget: Sequence[dict[str, Any]], *, seed: int,
                 max_length: int) -> list[dict[str, Any]]:
    """Encoded (question, refusal) pairs, one per forget row, in the same order."""
    return [encode_qa(tokenizer, template, row["question"], refusal(seed, i), max_length)
            for i, row in enumerate(forget)]
