"""In-context unlearning, ICUL (Pawelczyk et al. 2024, "In-Context Unlearning: Language Models as Few-Shot
Unlearners"), adapted from classification to question answering."""

from __future__ import annotations

import random
from typing import Annotated, Any, Literal

from pydantic import Field

from unlearning.data.context import Context
from unlearning.data.refusals import REFUSALS
from unlearning.methods import METHODS


@METHODS.register("icul", in_context=True)
def icul(question_row: dict[str, Any], forget_row: dict[str, Any], retain_rows: list[dict[str, Any]],
         rng: random.Random, *, n: Annotated[int, Field(ge=2)] = 4,
         flip: Literal["perturbed", "refusal"] = "perturbed") -> Context:
    """The forget item answered wrongly, then n − 1 retain items answered correctly, then the question.

    The paper flips the forget point's label and follows it with correctly labelled examples (context length
    n ∈ {2, 4, 6}); a QA answer has no label to flip, so the forget answer is replaced by one of its perturbed
    answers (`flip: perturbed`; a refusal where the row has none) or by a refusal (`flip: refusal`). The
    weights never change: the model is the target, and every question of the evaluation is asked after such
    a context (`forget_row`: the question's own row when it is a forget item, else one drawn from the forget
    set). No retain demonstration repeats the question.
    """
    perturbed = forget_row.get("perturbed_answer") or []
    wrong = rng.choice(perturbed) if flip == "perturbed" and perturbed else rng.choice(REFUSALS)
    others = [r for r in retain_rows if r["question"] != question_row["question"]]
    shown = rng.sample(others, min(n - 1, len(others)))
    return Context("", ((forget_row["question"], wrong), *((r["question"], r["answer"]) for r in shown)))
