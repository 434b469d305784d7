"""Typed stage functions: the one entry point of each pipeline stage for the CLI, Prefect and tests."""

from __future__ import annotations

from unlearning.data.prepare import PreparedData, prepare
from unlearning.evaluate.runner import ModelEval, evaluate
from unlearning.merge.stage import Merged, merge
from unlearning.models import BuiltModels, build_models
from unlearning.unlearn import Unlearned, unlearn

__all__ = ["BuiltModels", "Merged", "ModelEval", "PreparedData", "Unlearned", "build_models", "evaluate", "merge",
           "prepare", "unlearn"]
