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


def test_the_runs_table_view_gathers_every_runs_columns_and_a_long_description_is_cut(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from flows.mlflow_view import headline_metrics, labelled_history, table_view
    from unlearning.tracking import EXPERIMENT_KIND, RUNS_VIEW_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    medians = {"ga": {"forget_quality": 0.2, "model_utility": 0.9, "privleak": 3.0},
               "oracle": {"forget_quality": None, "model_utility": 0.8}}
    headline = headline_metrics(medians)
    assert headline["ga.privleak"] == 3.0 and headline["oracle.forget_quality"] is None
    assert table_view(medians) == ["ga.forget_quality", "ga.model_utility", "oracle.model_utility"]
    assert labelled_history("ga", [{"step": 1, "loss": 2.0}]) == [{"step": 1, "ga.loss": 2.0}]
    tracker = MlflowTracker(uri, "unit")
    with tracker.run("first"):
        tracker.show_in_runs_table(table_view(medians))
        tracker.set_description("x" * 9000)
        run = tracker.run_id
    with tracker.run("second"):
        tracker.show_in_runs_table(["npo.model_utility", "ga.model_utility", "ga@step2.model_utility"])
        tracker.log_metrics({"ga@step2.model_utility": 0.5})  # a snapshot's label: `@` is no MLflow name
        assert tracker.compare_url().endswith("/runs?workflowType=machine_learning&viewStateShareKey=unlearning")
    client = MlflowClient(uri)
    tags = client.get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND] == "custom_model_development"
    assert json.loads(tags[RUNS_VIEW_TAG])["selectedColumns"] == [
        "attributes.`Dataset`", "attributes.`Models`", "metrics.`ga.forget_quality`", "metrics.`ga.model_utility`",
        "metrics.`oracle.model_utility`", "metrics.`npo.model_utility`", "metrics.`ga_step2.model_utility`"]
    second = client.search_runs([tracker.experiment_id], filter_string="attributes.run_name = 'second'")[0]
    assert second.data.metrics == {"ga_step2.model_utility": 0.5}
    note = client.get_run(run).data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.endswith("the whole report is the artifact report.md)")
    # A kind someone set stays.
    client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND, "genai_development")
    MlflowTracker(uri, "unit")
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == "genai_development"
