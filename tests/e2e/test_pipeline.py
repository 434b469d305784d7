"""The Prefect flows end to end on a pico config: Prefect test harness (a real local API server) and a real
SQLite MLflow store. Covers the stage caching, the failure message and the resumed rerun, the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MEMORISE, pico_raw
from unlearning.train.job import KILL_ENV


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _top(runs: dict) -> object:
    """The pipeline's top-level run among `runs` (name → run)."""
    (top,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    return top


def _raw(tmp_path, **train):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return pico_raw(tmp_path / "run", model={"finetune": MEMORISE},
                    methods=[{"name": "ga"}, {"name": "npo", "label": "npo_a", "train": {"lr": 2e-3}}],
                    train={"num_processes": 1, "batch_size": 4, "max_steps": 3, "lr": 1e-3, **train},
                    merge={"lambdas": [2.0], "finetune": {"lr": 3e-3, "max_steps": 3}},
                    eval={"suite": "tofu", "max_new_tokens": 8}, tracking={"uri": uri}), uri


def test_pipeline_tracks_every_stage_caches_a_rerun_and_reruns_only_what_changed(tmp_path, harness):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    raw, uri = _raw(tmp_path)
    report = pipeline(raw)
    labels = ["target", "oracle", "ga", "npo_a", "merged_l2"]
    assert list(report["metrics"]) == labels
    assert set(report["stages"].values()) == {"Completed"}
    assert {"prepare", "build-models", "unlearn-ga", "unlearn-npo_a", "merge", "eval-merged_l2"} <= set(
        report["stages"])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pico").experiment_id
    runs = client.search_runs([experiment])
    names = {r.info.run_name: r for r in runs}
    stage_runs = {"prepare", "build-models", "train", "unlearn-ga", "unlearn-npo_a", "merge",
                  *(f"eval-{x}" for x in labels)}
    title = "pico · lr 0.001, 0.002 · ga, npo_a · 1 seed"  # the run name says what ran
    assert stage_runs | {title} == set(names)
    parent = names[title]
    assert all(names[n].data.tags["mlflow.parentRunId"] == parent.info.run_id for n in stage_runs)
    assert all(names[n].info.status == "FINISHED" for n in names)
    for label in labels:
        assert "model_utility" in names[f"eval-{label}"].data.metrics
        if label != "oracle":  # the oracle's forget quality against itself is unavailable, so not logged
            assert "forget_quality" in names[f"eval-{label}"].data.metrics
    assert names["unlearn-npo_a"].data.params["train.lr"] == "0.002"
    assert len(client.get_metric_history(names["unlearn-ga"].info.run_id, "loss")) == 3  # the training history
    assert parent.data.params["train.max_steps"] == "3"
    assert len(parent.data.tags["git_commit"]) >= 7 and parent.data.tags["prefect_flow_run_id"]
    assert parent.data.tags["data_fingerprint"] == names["prepare"].data.tags["data_fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "tradeoff.png", "config.resolved.json", "models"} <= artifacts
    # What the MLflow UI shows without expanding anything (tests/e2e/test_mlflow_ui.py looks in a browser).
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    for label in labels:
        for metric in ("forget_quality", "model_utility"):
            value = report["metrics"][label][metric]
            assert parent.data.metrics.get(f"{label}.{metric}") == (None if value is None else pytest.approx(value))
    assert parent.data.tags["mlflow.note.content"] == (tmp_path / "run/report/report.md").read_text()
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [parent.data.tags["data_fingerprint"]]
    assert [d.dataset.digest for d in names["prepare"].inputs.dataset_inputs] == [parent.data.tags["data_fingerprint"]]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "npo_a.loss")] == [1, 2, 3]
    logged = {m.name: m for m in client.search_logged_models([experiment])}
    assert set(logged) == {"ga", "npo_a"}
    for label in ("ga", "npo_a"):
        assert logged[label].source_run_id == names[f"unlearn-{label}"].info.run_id
        assert [o.model_id for o in names[f"unlearn-{label}"].outputs.model_outputs] == [logged[label].model_id]
        assert "model.safetensors" in {a.path for a in client.list_logged_model_artifacts(logged[label].model_id)}
    registered = raw["name"]
    for alias in ("target", "oracle", "best"):
        version = client.get_model_version_by_alias(registered, alias)
        assert version.tags["label"] == (report["best"] if alias == "best" else alias)

    # The same config again: every stage from the Prefect cache, the registry untouched.
    again = pipeline(raw)
    assert set(again["stages"]) == set(report["stages"]) and set(again["stages"].values()) == {"Cached"}
    assert again["metrics"] == report["metrics"]
    assert len(client.search_model_versions(f"name = '{registered}'")) == len({*report["registered"].values()})
    assert len(client.search_logged_models([experiment])) == 2  # the cached checkpoints linked, not uploaded again

    # One method's parameter changed: that method trains (alone in the launch) and is evaluated again; nothing
    # else runs.
    raw["methods"][1]["train"]["lr"] = 3e-3
    changed = pipeline(raw)
    ran = {name for name, state in changed["stages"].items() if state != "Cached"}
    assert ran == {"train", "unlearn-npo_a", "eval-npo_a"}
    assert sorted(m.name for m in client.search_logged_models([experiment])) == ["ga", "npo_a", "npo_a"]
    npo = Path(changed["models"]["0"]["npo_a"]).parent
    assert not (npo / "launch.log").exists() and (npo / "train.log").read_text().count("$ ") == 1


def test_in_context_methods_run_through_the_flow_without_training_and_are_never_registered(tmp_path, harness):
    """ICUL and the instruction baseline in the flow: no train task, one evaluation each on the target's weights,
    rows in the report and columns on the top-level run; a rerun is cached, another n is a new evaluation."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = pico_raw(tmp_path / "run", model={"finetune": MEMORISE},
                   methods=[{"name": "icul", "n": 2}, {"name": "instruct"}],
                   eval={"suite": "quick", "models": ["target", "oracle", "unlearned"], "context_length": 256},
                   tracking={"uri": uri})
    report = pipeline(raw)
    assert list(report["metrics"]) == ["target", "oracle", "icul", "instruct"]
    assert "train" not in report["stages"] and {"eval-icul", "eval-instruct"} <= set(report["stages"])
    assert not (tmp_path / "run/unlearn").exists()
    models = report["models"]["0"]
    assert models["icul"] == models["instruct"] == models["target"]
    assert report["metrics"]["icul"]["forget_probability"] != report["metrics"]["target"]["forget_probability"]
    assert "In context (the target's weights, every question asked after the method's context): icul, instruct." in (
        tmp_path / "run/report/report.md").read_text()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pico").experiment_id
    names = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert "pico · icul, instruct · 1 seed" in names  # no learning rate: nothing trains
    icul = names["unlearn-icul"]
    assert icul.data.tags["in_context"] == "true" and icul.data.params["method.n"] == "2"
    assert not client.search_logged_models([experiment])
    versions = client.search_model_versions(f"name = '{raw['name']}'")
    assert {v.tags["label"] for v in versions} <= {"target", "oracle"}  # an in-context pick has no weights of its own

    again = pipeline(raw)
    assert set(again["stages"].values()) == {"Cached"} and again["metrics"] == report["metrics"]
    raw["methods"][0]["n"] = 4
    changed = pipeline(raw)
    assert {name for name, state in changed["stages"].items() if state != "Cached"} == {"eval-icul"}


def test_kga_trains_through_the_flow_with_its_auxiliary_models_built_by_the_build_stage(tmp_path, harness):
    """KGA in the flow: the build task fine-tunes A_f and A_n beside the target and the oracle (its key covers
    them), the train task aligns the gaps on 2 ranks, the report has its row; the rerun is cached, and another
    retain weight retrains KGA alone."""
    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = pico_raw(tmp_path / "run", model={"finetune": MEMORISE}, methods=[{"name": "kga"}],
                   train={"num_processes": 2, "batch_size": 2, "max_steps": 3, "lr": 5e-3},
                   eval={"suite": "quick", "models": ["target", "oracle", "unlearned"]}, tracking={"uri": uri})
    report = pipeline(raw)
    assert list(report["metrics"]) == ["target", "oracle", "kga"]
    assert {"build-models", "train", "unlearn-kga", "eval-kga"} <= set(report["stages"])
    built = json.loads((tmp_path / "run/models/summary.json").read_text())
    assert sorted(built["auxiliary"]) == ["aux-forget", "aux-holdout"]
    assert all(not built["builds"][role]["cached"] for role in built["auxiliary"])  # by the build task, not later
    kga = json.loads((Path(report["models"]["0"]["kga"]).parent / "run_summary.json").read_text())
    assert kga["steps"] == 3 and kga["world_size"] == 2
    assert report["metrics"]["kga"]["forget_probability"] < report["metrics"]["target"]["forget_probability"]
    again = pipeline(raw)
    assert set(again["stages"].values()) == {"Cached"}
    raw["methods"][0]["alpha"] = 1.0
    changed = pipeline(raw)
    assert {name for name, state in changed["stages"].items() if state != "Cached"} == {"train", "unlearn-kga",
                                                                                       "eval-kga"}


def test_a_failed_stage_fails_the_run_clearly_and_the_rerun_resumes(tmp_path, harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from unlearning.unlearn import TrainingFailed

    raw, uri = _raw(tmp_path, checkpoint_every=1, max_steps=4)
    raw["eval"]["models"] = ["target", "oracle", "unlearned"]
    monkeypatch.setenv(KILL_ENV, "0:3")  # rank 0 is killed as step 3's checkpoint begins, at every start
    with pytest.raises(TrainingFailed) as e:
        pipeline(raw)
    message = str(e.value)
    assert "the last complete checkpoint is step2" in message and "rerun" in message
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pico").experiment_id])}
    assert runs["train"].info.status == "FAILED" and _top(runs).info.status == "FAILED"
    assert runs["build-models"].info.status == "FINISHED"

    monkeypatch.delenv(KILL_ENV)
    report = pipeline(raw)
    assert report["stages"]["prepare"] == "Cached" and report["stages"]["build-models"] == "Cached"
    assert report["stages"]["unlearn-ga"] == "Completed"
    ga = next(p for p in (tmp_path / "run" / "unlearn").iterdir() if p.name.startswith("ga-"))
    assert json.loads((ga / "run_summary.json").read_text())["resumed_from_step"] == 2


def test_sweep_runs_every_point_under_one_parent_with_one_report(tmp_path, harness):
    from mlflow.tracking import MlflowClient

    from flows.sweep import sweep

    raw, uri = _raw(tmp_path)
    raw["methods"] = [{"name": "ga"}]
    raw["eval"]["models"] = ["target", "oracle", "unlearned"]
    raw["tracking"]["register_models"] = False
    report = sweep(raw, {"train.lr": [1e-3, 2e-3]})
    assert list(report["metrics"]) == ["target", "oracle", "ga [train.lr=0.001]", "ga [train.lr=0.002]"]
    assert report["stages"]["build-models [train.lr=0.002]"] == "Cached"  # shared with the first point
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pico").experiment_id])}
    parent = runs["pico-sweep"].info.run_id
    assert runs["train.lr=0.001"].data.tags["mlflow.parentRunId"] == parent
    assert {"report.md", "tradeoff.png"} <= {a.path for a in client.list_artifacts(parent)}


def test_sequence_applies_requests_in_order_with_a_ledger(tmp_path, harness):
    from mlflow.tracking import MlflowClient

    from flows.sequence import sequence_flow

    raw, uri = _raw(tmp_path)
    raw["methods"] = [{"name": "npo", "train": {"lr": 3e-3, "max_steps": 4}}]
    raw["sequence"] = {"requests": 2}
    result = sequence_flow(raw)
    ledger = result["ledger"]
    first, second = ledger["applied"]
    assert [r["entities"] for r in ledger["requests"]] == [first["entities"], second["entities"]]
    assert first["started_from"] == ledger["target"] and second["started_from"] == first["model"]
    before = ledger["before"]["per_request"]
    # Each request's own items lose probability once it is applied, and stay below where they started.
    assert first["per_request"]["1"]["forget_probability"] < before["1"]["forget_probability"] - 0.1
    assert second["per_request"]["2"]["forget_probability"] < before["2"]["forget_probability"] - 0.1
    assert second["per_request"]["1"]["forget_probability"] < before["1"]["forget_probability"] - 0.1
    assert first["per_request"]["1"]["applied"] and not first["per_request"]["2"]["applied"]
    assert all(0 <= e["forget_quality"] <= 1 and 0 < e["model_utility"] <= 1 for e in ledger["applied"])
    assert json.loads(Path(result["path"]).read_text()) == ledger and Path(result["plot"]).stat().st_size > 10_000
    assert "| 2 |" in result["table"]

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pico").experiment_id])}
    parent = runs["pico-sequence"].info.run_id
    assert runs["request-2"].data.tags["mlflow.parentRunId"] == parent
    assert [m.step for m in client.get_metric_history(parent, "forget_quality_so_far")] == [1, 2]
    assert {"ledger.json", "sequence.png"} <= {a.path for a in client.list_artifacts(parent)}

    again = sequence_flow(raw)["ledger"]
    assert all(e["cached"] for e in again["applied"])
    assert [e["forget_quality"] for e in again["applied"]] == [e["forget_quality"] for e in ledger["applied"]]


def test_seeds_repeat_every_stage_and_the_report_gives_medians_ranges_and_the_noise_floor(tmp_path, harness):
    """Two seeds: each builds its own target and oracle and unlearns (GA, with a snapshot every 2 steps, evaluated
    as ga@step2); the report's values are the medians of the per-seed values, the oracles' forget quality against
    each other is the noise floor, and MLflow nests each seed's stage runs under a run of its own."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    raw, uri = _raw(tmp_path, max_steps=4, snapshot_every=2)
    raw.update(seeds=[0, 1], methods=[{"name": "ga"}])
    raw["attack"] = {"attacks": ["relearn", "quantize", "choice", "prefix"], "models": ["target", "ga"],
                     "relearn": {"steps": [5], "lr": 1e-3}, "quantize": {"schemes": ["nf4"]}}
    raw["eval"]["models"] = ["target", "oracle", "unlearned"]
    raw["tracking"]["register_models"] = False
    report = pipeline(raw)
    assert report["seeds"] == [0, 1] and list(report["metrics"]) == ["target", "oracle", "ga@step2", "ga"]
    per_seed = report["per_seed"]
    assert per_seed["0"]["target"]["forget_probability"] != per_seed["1"]["target"]["forget_probability"]
    assert report["models"]["0"]["target"] != report["models"]["1"]["target"]  # one target per seed
    for metric in ("forget_quality", "model_utility"):
        values = [per_seed[s]["ga"][metric] for s in ("0", "1")]
        assert report["metrics"]["ga"][metric] == pytest.approx(sum(values) / 2)  # the median of two
        assert report["spread"]["ga"][metric] == [min(values), max(values)]
    assert set(report["noise_floor"]) == {"0-1"} and 0 <= report["noise_floor"]["0-1"] <= 1
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "Seeds: 0, 1 (median [min, max]" in text and "Noise floor" in text
    assert {"unlearn-ga [seed=0]", "unlearn-ga [seed=1]", "eval-ga@step2 [seed=1]"} <= set(report["stages"])

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pico").experiment_id])
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    seed_runs = {r.data.tags["seed"]: r.info.run_id for r in by_name["seed-0"] + by_name["seed-1"]}
    assert set(seed_runs) == {"0", "1"} and len(by_name["unlearn-ga"]) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in by_name["unlearn-ga"]} == set(seed_runs.values())

    # The attack stage at each seed: the oracle attacked alike, a robustness section of medians over the seeds,
    # and one MLflow run per attack under each seed's run with every attacked model's metrics.
    robust = report["robustness"]
    points = ["relearn@5", "quantize:nf4", "choice", "prefix"]
    assert robust["points"] == points and {"attack [seed=0]", "attack [seed=1]"} <= set(report["stages"])
    assert list(robust["metrics"]) == ["oracle", "target", "ga"]
    for point in points:
        values = [robust["per_seed"][s]["ga"][f"{point}/forget_quality"] for s in ("0", "1")]
        assert robust["metrics"]["ga"][f"{point}/forget_quality"] == pytest.approx(sum(values) / 2)
    attack_json = json.loads(Path(robust["attack"]["1"]["ga"]).read_text())
    assert attack_json["points"]["choice"]["metrics"]["forget_quality"] == robust["per_seed"]["1"]["ga"][
        "choice/forget_quality"]
    assert "## Robustness" in text and "Robust forget quality" in text and Path(robust["plot"]).stat().st_size > 5000
    assert len(by_name["attack-relearn@5"]) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in by_name["attack-relearn@5"]} == set(seed_runs.values())
    seed1 = next(r for r in by_name["attack-choice"] if r.data.tags["mlflow.parentRunId"] == seed_runs["1"])
    assert seed1.data.metrics["ga.forget_quality"] == pytest.approx(robust["per_seed"]["1"]["ga"][
        "choice/forget_quality"])
    parent = _top({r.info.run_id: r for r in runs}).info.run_id
    assert "robustness.png" in {a.path for a in client.list_artifacts(parent)}
