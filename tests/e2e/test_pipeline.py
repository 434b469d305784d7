"""The Prefect flow end to end on a pico config, with a real SQLite MLflow store (work in progress, issue 6)."""

from __future__ import annotations

import pytest

from tests.conftest import MEMORISE, pico_raw


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_runs_every_stage_and_tracks_it(tmp_path, harness):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = pico_raw(tmp_path / "run", model={"finetune": MEMORISE}, method={"name": "ga"},
                   train={"num_processes": 1, "batch_size": 4, "max_steps": 3, "lr": 1e-3},
                   merge={"lambdas": [2.0], "finetune": {"lr": 3e-3, "max_steps": 3}},
                   eval={"suite": "quick", "models": ["target", "oracle", "unlearned", "merged"]},
                   tracking={"uri": uri})
    report = pipeline(raw)
    assert "| unlearned |" in report["table"] and "| merged_l2 |" in report["table"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pico").experiment_id])
    names = {r.info.run_name: r for r in runs}
    assert {"pico", "prepare", "build-models", "unlearn-ga", "merge", "eval-target", "eval-oracle",
            "eval-unlearned", "eval-merged_l2"} <= set(names)
    parent = names["pico"].info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for n, r in names.items() if n != "pico")
    assert "forget_quality" in names["eval-unlearned"].data.metrics
    assert names["pico"].data.params["train.max_steps"] == "3"
    assert {a.path for a in client.list_artifacts(parent)} == {"report.md", "tradeoff.png"}
