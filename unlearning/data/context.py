"""What an in-context method puts before a question: an instruction and demonstrations, nothing else.

A leaf module (no project imports), shared by the in-context methods (`methods/icul.py`, which build a
`Context` per question) and the encoder that renders it (`data/encoders.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """The text before one question: `instruction` (may be empty), then `demos`, (question, answer) pairs
    shown answered. When context, question and answer do not fit the model's window, demonstrations are
    dropped from the end first, so the first one (ICUL's flipped forget item) is the last to go."""

    instruction: str = ""
    demos: tuple[tuple[str, str], ...] = ()

    def shortened(self, keep: int) -> Context:
        """The same context with only its first `keep` demonstrations."""
        return Context(self.instruction, self.demos[:keep])
