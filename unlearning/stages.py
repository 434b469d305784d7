"""Typed stage functions: the one entry point of each pipeline stage for the CLI, Prefect and tests."""

from __future__ import annotations

from unlearning.attack import Attacked, attack, attack_key, attacked_labels
from unlearning.attack import preflight_problems as attack_preflight
from unlearning.config import method_runs
from unlearning.data.prepare import PreparedData, prepare
from unlearning.evaluate.runner import (
    ModelEval,
    checkpoint_problems,
    eval_order,
    evaluate,
    evaluate_model,
    run_models,
)
from unlearning.merge.stage import Merged, finetune_config, merge
from unlearning.models import BuiltModels, build_models
from unlearning.schema import ExperimentConfig
from unlearning.unlearn import Unlearned, data_problems, launch_problems, unlearn, unlearn_many

__all__ = ["Attacked", "BuiltModels", "Merged", "ModelEval", "PreparedData", "Unlearned", "attack", "attack_key",
           "attacked_labels", "build_models", "eval_order", "evaluate", "evaluate_model", "merge", "preflight",
           "prepare", "run_models", "unlearn", "unlearn_many"]


def preflight(cfg: ExperimentConfig, prepared: PreparedData) -> list[str]:
    """Every problem the later stages would raise about this config and data, found before any model is built:
    each method run's launch and data checks, the merge fine-tune's, the eval checkpoints and splits."""
    problems: list[str] = []
    roles = {entry.partition("=")[0] for entry in cfg.eval.models if "=" not in entry}
    runs = [*method_runs(cfg).items()] if "unlearned" in roles else []
    if "merged" in roles:
        runs.append(("merge.finetune", finetune_config(cfg)))
    for label, run in runs:
        where = "" if label == "unlearned" else f"{label}: "
        problems += [where + p for p in launch_problems(run) + data_problems(run, prepared)]
    problems += checkpoint_problems(cfg, prepared)
    if cfg.attack.attacks:
        problems += attack_preflight(cfg, prepared)
    return list(dict.fromkeys(problems))
