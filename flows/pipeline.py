"""The pipeline flow: prepare → build target and oracle → unlearn with each method → merge → evaluate every
model → (attack) → report. The sweep over a grid of config values is `flows/sweep.py`; the report,
`flows/report.py`.

Each task is one stage call that takes its upstream stages' results as arguments and passes its own on, and
each is cached by content under the stage's own key function (`unlearning.stages`: the one that names the
stage's output on disk), so the two cache layers cannot drift apart: a rerun of the same config skips every
finished stage, and a changed input reruns exactly its stage and the stages after it (a changed method
parameter: that method's training and evaluation). Results persist under `<output_dir>/.prefect`; a cached
result whose files were deleted since is recomputed. (The stages' own caches on disk serve the CLI commands
and a run with `pipeline.cache: false` alike.)

MLflow gets one parent run per pipeline run, tagged with the Prefect flow-run id, the git commit and the
data fingerprint, and one nested run per stage, per method and per evaluated model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import unlearning
from flows.mlflow_view import headline_metrics, labelled_history, run_title, table_view
from flows.report import SeedAttacks, SeedEvals, register, write_report
from unlearning import stages
from unlearning.config import apply_overrides, method_runs, seed_runs, trained_runs, validate_config
from unlearning.errors import raise_if
from unlearning.hashing import content_hash
from unlearning.models import model_identity
from unlearning.outputs import output_problems, write_atomic
from unlearning.schema import ExperimentConfig, Stage
from unlearning.tracking import NullTracker, flatten, tracker_for, tracking_problems

# --- the tasks: one stage call each, its inputs the upstream results -----------------------------------------


def _build(cfg: ExperimentConfig, prepared: stages.PreparedData) -> stages.BuiltModels:
    return stages.build_models(cfg, prepared)


def _train(jobs: dict[str, ExperimentConfig], prepared: stages.PreparedData, built: stages.BuiltModels
           ) -> dict[str, stages.Unlearned]:
    return stages.unlearn_many(jobs, prepared=prepared, built=built)


def _unlearn(cfg: ExperimentConfig, prepared: stages.PreparedData, built: stages.BuiltModels) -> stages.Unlearned:
    return stages.unlearn(cfg, prepared=prepared, built=built)


def _merge(cfg: ExperimentConfig, prepared: stages.PreparedData, built: stages.BuiltModels,
           finetuned: stages.Unlearned) -> stages.Merged:
    return stages.merge(cfg, prepared=prepared, built=built, finetuned=finetuned)


def _evaluate(cfg: ExperimentConfig, prepared: stages.PreparedData, label: str, subject: stages.Subject,
              oracle: stages.ModelEval | None) -> stages.ModelEval:
    return stages.evaluate_model(subject, prepared, cfg, label=label, oracle=oracle, is_oracle=label == "oracle")


def _attack(cfg: ExperimentConfig, prepared: stages.PreparedData, evals: dict[str, stages.ModelEval]
            ) -> stages.Attacked:
    return stages.attack(cfg, evals, prepared)


prepare_task = task(name="prepare")(stages.prepare)
build_task = task(name="build-models")(_build)
train_task = task(name="train")(_train)
unlearn_task = task(name="unlearn")(_unlearn)
merge_task = task(name="merge")(_merge)
evaluate_task = task(name="evaluate")(_evaluate)
attack_task = task(name="attack")(_attack)


# --- cache keys: each the stage's own key function, of the task's arguments ----------------------------------


def _key(stage: str, cfg: ExperimentConfig, *parts: Any) -> str:
    return content_hash(stage, unlearning.__version__, str(cfg.out.resolve()), *parts, length=32)


def prepare_key(_: Any, p: dict[str, Any]) -> str:
    return _key("prepare", p["cfg"], stages.prepare_key(p["cfg"]))


def build_key(_: Any, p: dict[str, Any]) -> str:
    return _key("build", p["cfg"], stages.build_key(p["cfg"], p["prepared"]))


def _run_key(cfg: ExperimentConfig, p: dict[str, Any]) -> str:
    return stages.run_key(cfg, str(p["built"].target), p["prepared"])


def train_key(_: Any, p: dict[str, Any]) -> str:
    jobs = p["jobs"]
    return _key("train", next(iter(jobs.values())), sorted((label, _run_key(cfg, p)) for label, cfg in jobs.items()))


def unlearn_key(_: Any, p: dict[str, Any]) -> str:
    return _key("unlearn", p["cfg"], _run_key(p["cfg"], p))


def merge_key(_: Any, p: dict[str, Any]) -> str:
    return _key("merge", p["cfg"], stages.merge_key(p["cfg"], p["prepared"], p["built"]))


def evaluate_key(_: Any, p: dict[str, Any]) -> str:
    return _key("eval", p["cfg"], stages.eval_dir(p["cfg"], p["label"], p["subject"], p["prepared"], p["oracle"]).name)


def attack_key(_: Any, p: dict[str, Any]) -> str:
    dirs = stages.attack_dirs(p["cfg"], p["prepared"], p["evals"])
    return _key("attack", p["cfg"], sorted(d.name for d in dirs.values()))


def _outputs_exist(result: Any) -> bool:
    """Whether every path a stage result names is still on disk (a cached result may outlive its files)."""
    if isinstance(result, dict):  # label → result of one job
        return all(_outputs_exist(r) for r in result.values())
    paths: list[Path] = []
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        values = value.values() if isinstance(value, dict) else [value]
        paths += [v for v in values if isinstance(v, Path)]
    return all(p.exists() for p in paths)


class StageRunner:
    """Calls the stage tasks of one config with its cache, retries and time limits; records how each ended."""

    def __init__(self, cfg: ExperimentConfig, tracker: NullTracker, tag: str = ""):
        self.cfg, self.tracker, self.tag = cfg, tracker, tag  # tag: appended to task names, e.g. " [seed=1]"
        self.states: dict[str, str] = {}
        self.storage = (cfg.out / ".prefect").resolve()  # a Path: a local result store, nothing to register

    def __call__(self, t: Any, key: Callable[[Any, dict[str, Any]], str], name: str, stage: Stage, *args: Any,
                 retries: int = 0) -> Any:
        p = self.cfg.pipeline
        name += self.tag
        options: dict[str, Any] = {"task_run_name": name, "timeout_seconds": p.timeout_s.get(stage),
                                   "retries": retries, "retry_delay_seconds": p.retry_delay_s}
        if p.cache:
            options.update(cache_key_fn=key, persist_result=True, result_storage=self.storage)
        else:
            options.update(cache_policy=NO_CACHE)
        configured = t.with_options(**options)
        state = configured(*args, return_state=True)
        result = state.result()  # raises the stage's own error when it failed
        if state.name == "Cached" and not _outputs_exist(result):
            state = configured.with_options(refresh_cache=True)(*args, return_state=True)
            result = state.result()
        self.states[name] = state.name
        self.tracker.set_tags({"prefect_state": state.name})
        return result


# --- the pipeline --------------------------------------------------------------------------------------------


def run_seeds(cfg: ExperimentConfig, tracker: NullTracker) -> tuple[SeedEvals, dict[str, str], SeedAttacks]:
    """Every stage of `cfg` at each of its seeds (`seed_runs`), each seed under a nested MLflow run of its own
    when there are several; (seed → label → evaluation, task name → final state, seed → attack results)."""
    runs = seed_runs(cfg)
    by_seed: SeedEvals = {}
    attacked: SeedAttacks = {}
    states: dict[str, str] = {}
    for seed, run in runs.items():
        with (tracker.run(f"seed-{seed}", nested=True, tags={"seed": str(seed)}) if len(runs) > 1
              else contextlib.nullcontext()):
            if len(runs) > 1:
                tracker.log_params({"seed": seed})
            by_seed[seed], seed_states, seed_attacked = run_stages(run, tracker,
                                                                   tag=f" [seed={seed}]" if len(runs) > 1 else "")
        states.update(seed_states)
        if seed_attacked is not None:
            attacked[seed] = seed_attacked
    return by_seed, states, attacked


def run_stages(cfg: ExperimentConfig, tracker: NullTracker, tag: str = ""
               ) -> tuple[dict[str, stages.ModelEval], dict[str, str], stages.Attacked | None]:
    """Every stage of one config under `tracker`'s current run; (label → evaluation, task name → final state,
    the attack stage's results or None without attacks)."""
    call = StageRunner(cfg, tracker, tag)
    with tracker.run("prepare", nested=True):
        prepared = call(prepare_task, prepare_key, "prepare", "prepare", cfg, retries=cfg.pipeline.retries)
        tracker.set_tags({"data_fingerprint": prepared.fingerprint})
        counts = prepared.info()["counts"]
        tracker.log_metrics({f"{split}_items": n for split, n in counts.items()})
        tracker.log_dataset(cfg.name, prepared.fingerprint, prepared.path, counts)
    tracker.set_tags({"data_fingerprint": prepared.fingerprint})
    tracker.log_dataset(cfg.name, prepared.fingerprint, prepared.path, counts)
    raise_if(stages.preflight(cfg, prepared))  # every config/data problem, before any model is built

    roles = stages.eval_roles(cfg)
    with tracker.run("build-models", nested=True):
        built = call(build_task, build_key, "build-models", "build", cfg, prepared)
        tracker.log_metrics(flatten(built.summary["probability"]))  # type: ignore[arg-type]
        tracker.log_artifact(cfg.out / "models" / "summary.json")
    runs = method_runs(cfg) if "unlearned" in roles else {}
    jobs = stages.training_jobs(cfg, trained_runs(cfg) if runs else {}, "merged" in roles)
    trained: dict[str, stages.Unlearned] = {}
    if jobs:  # every training job of this config in one start of the ranks
        with tracker.run("train", nested=True):
            tracker.log_params({"jobs": ", ".join(jobs)})
            trained = call(train_task, train_key, "train", "unlearn", jobs, prepared, built)
    for label, run in runs.items():
        if label not in jobs:  # in context: nothing trains, the evaluation asks the target through its prompts
            with tracker.run(f"unlearn-{label}", nested=True, tags={"in_context": "true"}):
                tracker.log_params(flatten({"method": run.method.model_dump()}))
            continue
        with tracker.run(f"unlearn-{label}", nested=True):
            tracker.log_params(flatten({"method": run.method.model_dump(), "train": run.train.model_dump()}))
            done = trained[label] = call(unlearn_task, unlearn_key, f"unlearn-{label}", "unlearn", run, prepared,
                                         built)
            tracker.log_history(done.summary["losses"])
            tracker.log_metrics({k: done.summary[k] for k in ("steps", "tokens_per_s", "peak_rss_mb", "train_s")})
            tracker.log_artifact(done.run_dir / "run_summary.json")
            for name, path in stages.run_models(label, done, cfg).items() if cfg.tracking.log_models else ():
                tracker.log_model(path, name, model_identity(path), flatten({"method": run.method.model_dump()}))
        tracker.log_history(labelled_history(label, done.summary["losses"]))  # one chart per method up here
    merged = None
    if "merged" in roles:
        with tracker.run("merge", nested=True):
            merged = call(merge_task, merge_key, "merge", "merge", cfg, prepared, built,
                          trained[stages.FINETUNE_JOB])
            tracker.log_artifact(cfg.out / "merge" / "summary.json")

    def evaluate_one(label: str, subject: stages.Subject, oracle: stages.ModelEval | None) -> stages.ModelEval:
        with tracker.run(f"eval-{label}", nested=True):
            result = call(evaluate_task, evaluate_key, f"eval-{label}", "eval", cfg, prepared, label, subject,
                          oracle)
            tracker.log_metrics(result.metrics)
            tracker.log_artifact(result.eval_dir / "eval.json")
        return result

    evals = stages.evaluate_all(stages.eval_subjects(cfg, built, trained, merged), evaluate_one)
    attacked = None
    if cfg.attack.attacks:
        with tracker.run("attack", nested=True):
            attacked = call(attack_task, attack_key, "attack", "attack", cfg, prepared, evals)
            for label, path in attacked.paths.items():
                tracker.log_artifact(path, f"attack/{label}")
        for point in attacked.points:  # one run per attack: every model's metrics after it, side by side
            with tracker.run(f"attack-{point}", nested=True, tags={"attack": point}):
                tracker.log_metrics({f"{label}.{k}": v for label, r in attacked.results.items()
                                     for k, v in r["points"][point]["metrics"].items()})
    return evals, call.states, attacked


def git_commit() -> str:
    """The commit of the code that ran (the package version outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(unlearning.__file__).parent, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"unlearning-{unlearning.__version__}"


def run_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"prefect_flow_run_id": str(flow_run.id or ""), "prefect_flow_run_name": str(flow_run.name or ""),
            "git_commit": git_commit()}


def resolve(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A flow's `config` parameter, a mapping or a YAML path (deployments pass paths), with `overrides`
    applied: the raw mapping, not yet validated."""
    from unlearning.config import load_config

    if isinstance(config, str):
        return load_config(config, overrides).to_dict()
    return apply_overrides(config, overrides or [])


@flow(name="unlearning-pipeline")
def pipeline(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of `config` (an experiment mapping or YAML path, plus KEY=VALUE `overrides`) and
    return the report."""
    cfg = validate_config(resolve(config, overrides))
    raise_if(output_problems(cfg.out) + tracking_problems(cfg.tracking.uri))  # before any MLflow run or stage
    tracker = tracker_for(cfg.tracking.uri, cfg.tracking.experiment or cfg.name)
    with tracker.run(run_title(cfg), tags=run_tags()):
        tracker.log_params(flatten(cfg.to_dict()))
        (cfg.out).mkdir(parents=True, exist_ok=True)
        write_atomic(cfg.out / "config.resolved.json", json.dumps(cfg.to_dict(), indent=2))
        tracker.log_artifact(cfg.out / "config.resolved.json")
        by_seed, states, attacked = run_seeds(cfg, tracker)
        report = write_report(cfg.out / "report", cfg.name, by_seed, tracker, states,
                              tuple(cfg.eval.references), attacked)
        report["registered"] = register(cfg, by_seed, report["best"], tracker)
        tracker.log_metrics(headline_metrics(report["metrics"]))
        tracker.show_in_runs_table(table_view(report["metrics"]))
    return report
