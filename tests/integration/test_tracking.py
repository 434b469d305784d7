"""The MLflow adapter against a real SQLite store: nested runs, batched metrics, artifacts, the registry."""

from __future__ import annotations

import os

import pytest

from unlearning.tracking import MlflowTracker, NullTracker, flatten, tracker_for

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def test_flatten_the_resolved_config():
    assert flatten({"train": {"lr": 2e-4, "lora": {"r": 8}}, "merge": {"lambdas": [1.0, 2.0]}, "x": None}) == {
        "train.lr": "0.0002", "train.lora.r": "8", "merge.lambdas": "[1.0, 2.0]", "x": "None"}


def test_runs_params_metrics_artifacts_and_registry_land_in_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    tracker = MlflowTracker(uri, "unit")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the next config's default is not changed
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "report.md").write_text("| model |")
    with tracker.run("pipeline", tags={"git_commit": "abc"}):
        parent = tracker.run_id
        tracker.log_params(flatten({"train": {"lr": 1e-4}}))
        with tracker.run("unlearn", nested=True):
            child = tracker.run_id
            tracker.log_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
            tracker.log_metrics({"forget_quality": 0.3, "privleak": None, "nan": float("nan")})
            version = tracker.register_model(tmp_path / "model", "demo-unlearned", ["unlearned"])
        tracker.log_artifact(tmp_path / "report.md")
    client = MlflowClient(uri)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(child, "loss")] == [2.0, 1.5]
    assert run.data.metrics == {"forget_quality": 0.3, "loss": 1.5}  # None and NaN are not logged as numbers
    assert client.get_run(parent).data.params == {"train.lr": "0.0001"}
    assert [a.path for a in client.list_artifacts(parent)] == ["report.md"]
    assert str(client.get_model_version_by_alias("demo-unlearned", "unlearned").version) == version


def test_a_failing_block_marks_the_run_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "unit")
    with pytest.raises(RuntimeError), tracker.run("boom"):
        run_id = tracker.run_id
        raise RuntimeError("stage failed")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_other_ranks_and_no_uri_get_the_null_tracker(tmp_path):
    assert isinstance(tracker_for(f"sqlite:///{tmp_path / 'm.db'}", "x", rank=1), NullTracker)
    assert type(tracker_for(None, "x")) is NullTracker
    assert not (tmp_path / "m.db").exists()
