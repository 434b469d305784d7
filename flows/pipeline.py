"""The Prefect pipeline: prepare → build target and oracle → unlearn → merge → evaluate → report.

Tasks are thin calls to the stage functions in `unlearning/` (each content-cached on disk, so a rerun
skips finished work); MLflow gets one parent run per pipeline run and a nested run per stage, through
the tracking adapter. Work in progress: see issue 6 for what is still to come (methods lists, Prefect
result caching, sweeps, sequences).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from unlearning import stages
from unlearning.config import ExperimentConfig, validate_config
from unlearning.evaluate.report import best_model, results_table, tradeoff_plot
from unlearning.tracking import NullTracker, flatten, tracker_for


def _stage_task(name: str, fn: Any, **options: Any) -> Any:
    """A Prefect task that calls one stage function (the stages cache their own outputs by content)."""
    return task(fn, name=name, cache_policy=NO_CACHE, **options)


prepare_task = _stage_task("prepare", stages.prepare, retries=2, retry_delay_seconds=2)  # I/O: retried
build_task = _stage_task("build-models", stages.build_models)
unlearn_task = _stage_task("unlearn", stages.unlearn)
merge_task = _stage_task("merge", stages.merge)
evaluate_task = _stage_task("evaluate", stages.evaluate)


def _report(cfg: ExperimentConfig, evals: dict[str, stages.ModelEval], tracker: NullTracker) -> dict[str, Any]:
    metrics = {label: r.metrics for label, r in evals.items()}
    out = cfg.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(metrics)
    best, why = best_model(metrics)
    (out / "report.md").write_text(f"{table}\n\nBest: {best} ({why})\n")
    plot = tradeoff_plot(metrics, out / "tradeoff.png", title=cfg.name)
    tracker.log_artifact(out / "report.md")
    tracker.log_artifact(plot)
    return {"table": table, "best": best, "why": why, "plot": str(plot)}


@flow(name="unlearning-pipeline")
def pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """Run every stage of `config` (a raw experiment mapping) and return the report."""
    cfg = validate_config(config)
    tracker = tracker_for(cfg.tracking.uri, cfg.tracking.experiment or cfg.name)
    with tracker.run(cfg.name):
        tracker.log_params(flatten(cfg.to_dict()))
        with tracker.run("prepare", nested=True):
            prepared = prepare_task(cfg)
            tracker.set_tags({"data_fingerprint": prepared.fingerprint})
        with tracker.run("build-models", nested=True):
            build_task(cfg)
        with tracker.run(f"unlearn-{cfg.method.name}", nested=True):
            done = unlearn_task(cfg)
            tracker.log_history(done.summary["losses"])
            tracker.log_artifact(done.run_dir / "run_summary.json")
        with tracker.run("merge", nested=True):
            merge_task(cfg)
        evals = evaluate_task(cfg)
        for label, result in evals.items():
            with tracker.run(f"eval-{label}", nested=True):
                tracker.log_metrics(result.metrics)
                tracker.log_artifact(result.eval_dir / "eval.json")
        report = _report(cfg, evals, tracker)
    (cfg.out / "report" / "report.json").write_text(json.dumps(report, indent=2))
    return report


def run(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load and validate a config file (every problem before anything starts), then run the flow."""
    from unlearning.config import load_config

    return pipeline(load_config(config_path, overrides).to_dict())
