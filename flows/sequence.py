"""The sequential-unlearning flow: forget requests one after another, a ledger, metrics after each request.

One coarse Prefect task runs `unlearning.sequence.sequence` (each request's unlearning and evaluation are
cached on disk, so a rerun continues where a failure stopped); MLflow gets a parent run with a nested run
per request, the per-request metrics as series over the number of requests, the ledger and the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import resolve, run_tags
from flows.report import artifact_key
from unlearning.config import validate_config
from unlearning.evaluate.report import ledger_table
from unlearning.sequence import sequence
from unlearning.tracking import flatten, tracker_for

sequence_task = task(name="sequence", cache_policy=NO_CACHE)(sequence)


@flow(name="unlearning-sequence")
def sequence_flow(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Apply `config`'s forget requests in order (a mapping or YAML path, plus KEY=VALUE `overrides`);
    return the ledger, its path, the plot and the table."""
    cfg = validate_config(resolve(config, overrides))
    tracker = tracker_for(cfg.tracking.uri, cfg.tracking.experiment or cfg.name)

    def on_request(entry: dict[str, Any]) -> None:
        step = entry["request"]
        with tracker.run(f"request-{step}", nested=True):
            tracker.log_params({"entities": ", ".join(entry["entities"]), "items": entry["items"],
                                "started_from": entry["started_from"]})
            tracker.log_metrics({k: entry[k] for k in ("forget_quality", "model_utility", "forget_probability")})
            tracker.log_artifact(Path(entry["eval"]))
        tracker.log_metrics({"forget_quality_so_far": entry["forget_quality"], "model_utility": entry["model_utility"],
                             **{f"request_{r}_forget_probability": v["forget_probability"]
                                for r, v in entry["per_request"].items()}}, step=step)

    with tracker.run(f"{cfg.name}-sequence", tags=run_tags()):
        tracker.log_params(flatten(cfg.to_dict()))
        result = sequence_task(cfg, on_request)
        table = ledger_table(result.ledger)
        tracker.log_artifact(result.path)
        tracker.log_artifact(result.plot)
        create_markdown_artifact(f"# {cfg.name}: sequential unlearning\n\n{table}\n",
                                 key=f"{artifact_key(cfg.name)}-sequence",
                                 description="metrics after each forget request")
        url = tracker.run_url()
    return {"ledger": result.ledger, "path": str(result.path), "plot": str(result.plot), "table": table,
            "mlflow_run": url}
