"""What a person sees of a pipeline run in the MLflow UI's runs table, without expanding anything: a run name
that says what ran, the report's headline metrics per model as columns of the top-level run (the columns of
the runs-table view, `Tracker.show_in_runs_table`), and each method's loss curve as a chart of that run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from unlearning.config import method_runs, trained_runs
from unlearning.evaluate.report import COLUMNS, MUSE_COLUMNS
from unlearning.schema import ExperimentConfig


def run_title(cfg: ExperimentConfig) -> str:
    """e.g. `demo · lr 1e-05 · ga, npo · 3 seeds`: the config, its learning rate(s), methods and seeds (the lr
    early: the UI's name column is narrow, and the lr is what most often tells two runs apart)."""
    runs = method_runs(cfg)
    lrs = sorted({run.train.lr for run in trained_runs(cfg).values()})  # an in-context method has none
    seeds = len(cfg.seeds) if cfg.seeds else 1
    methods = [run.method.name if label == "unlearned" else label for label, run in runs.items()]
    parts = [cfg.name, *(["lr " + ", ".join(f"{lr:g}" for lr in lrs)] if lrs else []), ", ".join(methods)]
    return " · ".join([*parts, f"{seeds} seed{'s' if seeds > 1 else ''}"])


TABLE_VIEW = ("forget_quality", "model_utility")  # the runs-table view's columns: the trade-off plot's axes


def headline_metrics(medians: Mapping[str, Mapping[str, float | None]],
                     metrics: Sequence[str] | None = None) -> dict[str, float | None]:
    """`<model>.<metric>` for the report table's metrics (medians over seeds): one column per model and metric
    on the top-level run, so two pipeline runs compare side by side. None where a model has no value. By default
    COLUMNS, MUSE's VerbMem / KnowMem and every multiple-choice split's acc."""
    if metrics is None:
        choice = sorted({k for values in medians.values() for k in values
                         if k.endswith("_acc") and not k.startswith("lm_eval_")})
        metrics = (*COLUMNS, *MUSE_COLUMNS, *choice)
    return {f"{label}.{metric}": values.get(metric) for label, values in medians.items() for metric in metrics}


def table_view(medians: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """The headline metrics the runs-table view shows (`TABLE_VIEW`), of those this run has a value for."""
    return [key for key, value in headline_metrics(medians, TABLE_VIEW).items() if value is not None]


def labelled_history(label: str, rows: Sequence[Mapping[str, Any]], step_key: str = "step"
                     ) -> list[dict[str, Any]]:
    """A training history with its series renamed `<label>.<series>` (the step kept): every method's loss as
    its own chart on one run."""
    return [{step_key: row[step_key], **{f"{label}.{k}": v for k, v in row.items() if k != step_key}}
            for row in rows]
