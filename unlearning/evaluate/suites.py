"""Named metric suites: what `eval.suite` selects.

A suite is a list of registered metric names (`unlearning/evaluate/metrics.py`), plus whether it needs
greedy generations (the slow probe). `tofu` is the full report (with VerbMem where the data has text splits);
 `muse` the MUSE-style metrics (VerbMem on text, KnowMem on QA, PrivLeak, utility);
`wmdp` multiple-choice accuracy (lm-evaluation-harness's acc and acc_norm) with VerbMem and PrivLeak on the text
corpora; `quick` the loss-based metrics only, no generation, for sweeps and stopping checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearning.errors import UserError
from unlearning.evaluate.metrics import METRICS


@dataclass(frozen=True)
class Suite:
    name: str
    metrics: tuple[str, ...]
    generations: bool


SUITES = {s.name: s for s in (
    Suite("tofu", ("probability", "choice_accuracy", "rouge", "truth_ratio", "paraphrased", "forget_quality",
                   "model_utility", "mia", "privleak", "memorization", "verbmem", "multiple_choice"), generations=True),
    Suite("muse", ("verbmem", "knowmem", "probability", "model_utility", "mia", "privleak", "memorization"),
          generations=True),
    Suite("wmdp", ("multiple_choice", "verbmem", "probability", "mia", "privleak"), generations=True),
    Suite("quick", ("probability", "choice_accuracy", "truth_ratio", "forget_quality", "mia", "privleak",
                    "memorization", "multiple_choice"), generations=False),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"eval.suite: unknown suite {name!r}; valid: {', '.join(SUITES)}")
    for metric in SUITES[name].metrics:
        METRICS.get(metric)  # a suite naming an unregistered metric is a bug; fail loudly
    return SUITES[name]
