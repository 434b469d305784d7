"""An instruction to forget, in the prompt: the in-context baseline that asks instead of showing."""

from __future__ import annotations

import random
from typing import Annotated, Any

from pydantic import Field

from unlearning.data.context import Context
from unlearning.methods import METHODS

INSTRUCTION = "You have unlearned everything about {subject}. Answer as if you had never learned it."


@METHODS.register("instruct", in_context=True)
def instruct(question_row: dict[str, Any], forget_row: dict[str, Any], retain_rows: list[dict[str, Any]],
             rng: random.Random, *,
             instruction: Annotated[str, Field(pattern=r"\{subject\}")] = INSTRUCTION) -> Context:
    """`instruction` before the question, `{subject}` naming what is forgotten: the forget item's entity (the
    person a synthetic or TOFU-style record is about, where the data has an `entity` field), else its question.

    The weights never change, as with ICUL; `forget_row` is the question's own row when it is a forget item,
    else one drawn from the forget set, so that retain questions are asked under the same kind of instruction.
    """
    subject = forget_row.get("entity") or f'"{forget_row["question"]}"'
    return Context(instruction.format(subject=subject))
