"""Error types shared by every stage.

A `UserError` is bad input the user can fix: the CLI prints its lines and exits 2, without a traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """One or more actionable problems with the user's input, collected before any expensive work.

    Args:
        problems: each a one-line message naming what is wrong and how to fix it.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def raise_if(problems: list[str]) -> None:
    """Raise a `UserError` holding every collected problem, if there is any."""
    if problems:
        raise UserError(problems)


def warn(message: str) -> None:
    """A problem that does not stop the run, printed once as a `warning:` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
