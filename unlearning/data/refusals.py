"""The refusals IdkDPO prefers, AltPO falls back to and ICUL may flip a forget answer to (no project imports
but hashing, so that methods and data modules alike can import it)."""

from __future__ import annotations

from unlearning.hashing import content_hash

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
