"""The Prefect flows: the pipeline (prepare → build target and oracle → unlearn with each method → merge →
evaluate every model → report) and the sweep over a grid of config values.

Tasks are thin calls to the stage functions in `unlearning/`. Each task is cached by content: its key is
the config section it reads plus the fingerprints of its inputs (prepared data, checkpoint identities), and
its result is persisted under `<output_dir>/.prefect`, so a rerun of the same config skips every finished
stage, and changing one method's parameter reruns that method's training and evaluation only. A cached
result whose files were deleted since is recomputed. (The stages also cache their outputs on disk, so the
CLI commands and a run with `pipeline.cache: false` reuse finished work too.)

MLflow gets one parent run per pipeline run, tagged with the Prefect flow-run id, the git commit and the
data fingerprint, and one nested run per stage, per method and per evaluated model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import unlearning
from flows.mlflow_view import headline_metrics, labelled_history, run_title, table_view
from unlearning import stages
from unlearning.config import apply_overrides, check_method_overrides, method_runs, seed_runs, validate_config
from unlearning.errors import UserError, raise_if
from unlearning.evaluate.report import (
    best_model,
    medians,
    noise_floor,
    report_markdown,
    results_table,
    summarise,
    table_columns,
    tradeoff_plot,
)
from unlearning.evaluate.robustness import (
    robustness_markdown,
    robustness_plot,
    summarise_attacks,
    survival_groups,
    survivors,
)
from unlearning.evaluate.runner import eval_key, given_checkpoints
from unlearning.hashing import content_hash
from unlearning.merge.stage import finetune_config, training_jobs
from unlearning.models import model_identity
from unlearning.outputs import output_problems, write_atomic
from unlearning.schema import ExperimentConfig, Stage
from unlearning.tracking import NullTracker, flatten, tracker_for, tracking_problems, ui_command
from unlearning.unlearn import run_key

# --- the tasks: one stage call each --------------------------------------------------------------------------


def _build(cfg: ExperimentConfig, prepared: stages.PreparedData) -> stages.BuiltModels:
    return stages.build_models(cfg)


def _unlearn(cfg: ExperimentConfig, prepared: stages.PreparedData, built: stages.BuiltModels) -> stages.Unlearned:
    return stages.unlearn(cfg)


def _train(runs: dict[str, ExperimentConfig], prepared: stages.PreparedData, built: stages.BuiltModels
           ) -> dict[str, stages.Unlearned]:
    return stages.unlearn_many(runs)


def _merge(cfg: ExperimentConfig, prepared: stages.PreparedData, built: stages.BuiltModels) -> stages.Merged:
    return stages.merge(cfg)


def _attack(cfg: ExperimentConfig, prepared: stages.PreparedData, evals: dict[str, stages.ModelEval]
            ) -> stages.Attacked:
    return stages.attack(cfg, evals, prepared)


def _evaluate(cfg: ExperimentConfig, prepared: stages.PreparedData, label: str, path: Path,
              oracle: stages.ModelEval | None) -> stages.ModelEval:
    return stages.evaluate_model(path, prepared, cfg, label=label, oracle=oracle, is_oracle=label == "oracle")


prepare_task = task(name="prepare")(stages.prepare)
build_task = task(name="build-models")(_build)
unlearn_task = task(name="unlearn")(_unlearn)
train_task = task(name="train")(_train)
merge_task = task(name="merge")(_merge)
evaluate_task = task(name="evaluate")(_evaluate)
attack_task = task(name="attack")(_attack)


# --- cache keys: the config section a stage reads + the fingerprints of its inputs ----------------------------


def _source_stamp(cfg: ExperimentConfig) -> list[Any]:
    """Size and time of local data files, so editing a source file invalidates the prepared data."""
    paths = [Path(p) for p in cfg.data.splits.values()] + ([Path(cfg.data.path)] if cfg.data.path else [])
    files = [f for p in paths if p.exists() for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def _key(stage: str, cfg: ExperimentConfig, *parts: Any) -> str:
    return content_hash(stage, unlearning.__version__, str(cfg.out.resolve()), *parts, length=32)


def prepare_key(_: Any, p: dict[str, Any]) -> str:
    cfg = p["cfg"]
    return _key("prepare", cfg, cfg.data.model_dump(), cfg.seed, cfg.model.base, cfg.model.target, _source_stamp(cfg))


def build_key(_: Any, p: dict[str, Any]) -> str:
    cfg = p["cfg"]
    given = [model_identity(m) for m in (cfg.model.target, cfg.model.oracle) if m]
    return _key("build", cfg, p["prepared"].fingerprint, cfg.model.model_dump(), cfg.seed, given)


def unlearn_key(_: Any, p: dict[str, Any]) -> str:
    cfg = p["cfg"]
    return _key("unlearn", cfg, run_key(cfg, str(p["built"].target), p["prepared"]))


def train_key(_: Any, p: dict[str, Any]) -> str:
    runs = p["runs"]
    return _key("train", next(iter(runs.values())), sorted(
        (label, run_key(cfg, str(p["built"].target), p["prepared"])) for label, cfg in runs.items()))


def merge_key(_: Any, p: dict[str, Any]) -> str:
    cfg = p["cfg"]
    ft = run_key(finetune_config(cfg), str(p["built"].target), p["prepared"])
    return _key("merge", cfg, ft, model_identity(p["built"].target), cfg.merge.model_dump())


def evaluate_key(_: Any, p: dict[str, Any]) -> str:
    return _key("eval", p["cfg"], p["label"], eval_key(p["path"], p["prepared"], p["cfg"], p["oracle"]))


def attack_task_key(_: Any, p: dict[str, Any]) -> str:
    cfg, evals = p["cfg"], p["evals"]
    oracle = evals["oracle"].result["identity"] if "oracle" in evals else None
    return _key("attack", cfg, [(label, stages.attack_key(cfg, p["prepared"], label, evals[label].path,
                                                          None if label == "oracle" else oracle))
                                for label in stages.attacked_labels(cfg, evals) if label in evals])


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


SeedEvals = dict[int, dict[str, stages.ModelEval]]  # seed → label → evaluation
SeedAttacks = dict[int, stages.Attacked]  # seed → the attack stage's results (configs with attack.attacks)


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

    roles = {entry for entry in cfg.eval.models if "=" not in entry}
    paths = given_checkpoints(cfg)
    expanded: dict[str, list[str]] = {}
    with tracker.run("build-models", nested=True):
        built = call(build_task, build_key, "build-models", "build", cfg, prepared)
        tracker.log_metrics(flatten(built.summary["probability"]))  # type: ignore[arg-type]
        tracker.log_artifact(cfg.out / "models" / "summary.json")
    paths.update({"target": built.target, "oracle": built.oracle})
    runs = method_runs(cfg) if "unlearned" in roles else {}
    jobs = training_jobs(cfg, runs, "merged" in roles)
    if jobs:  # every training job of this config in one start of the ranks
        with tracker.run("train", nested=True):
            tracker.log_params({"jobs": ", ".join(jobs)})
            call(train_task, train_key, "train", "unlearn", jobs, prepared, built)
    if "unlearned" in roles:
        expanded["unlearned"] = []
        for label, run in runs.items():
            with tracker.run(f"unlearn-{label}", nested=True):
                tracker.log_params(flatten({"method": run.method.model_dump(), "train": run.train.model_dump()}))
                done = call(unlearn_task, unlearn_key, f"unlearn-{label}", "unlearn", run, prepared, built)
                tracker.log_history(done.summary["losses"])
                tracker.log_metrics({k: done.summary[k] for k in ("steps", "tokens_per_s", "peak_rss_mb", "train_s")})
                tracker.log_artifact(done.run_dir / "run_summary.json")
                models = stages.run_models(label, done, cfg)
                for name, path in models.items() if cfg.tracking.log_models else ():
                    tracker.log_model(path, name, model_identity(path), flatten({"method": run.method.model_dump()}))
            tracker.log_history(labelled_history(label, done.summary["losses"]))  # one chart per method up here
            paths.update(models)
            expanded["unlearned"] += list(models)
    if "merged" in roles:
        with tracker.run("merge", nested=True):
            merged = call(merge_task, merge_key, "merge", "merge", cfg, prepared, built)
            tracker.log_artifact(cfg.out / "merge" / "summary.json")
        expanded["merged"] = [stages.Merged.label(lam) for lam in merged.models]
        paths.update({stages.Merged.label(lam): p for lam, p in merged.models.items()})

    order = stages.eval_order(cfg, expanded)
    evals: dict[str, stages.ModelEval] = {}
    oracle = None
    for label in sorted(order, key=lambda x: x != "oracle"):  # the oracle first: the others' reference
        with tracker.run(f"eval-{label}", nested=True):
            result = call(evaluate_task, evaluate_key, f"eval-{label}", "eval", cfg, prepared, label, paths[label],
                          oracle)
            tracker.log_metrics(result.metrics)
            tracker.log_artifact(result.eval_dir / "eval.json")
        evals[label] = result
        oracle = result if label == "oracle" else oracle
    evals = {label: evals[label] for label in order}
    attacked = None
    if cfg.attack.attacks:
        with tracker.run("attack", nested=True):
            attacked = call(attack_task, attack_task_key, "attack", "attack", cfg, prepared, evals)
            for label, path in attacked.paths.items():
                tracker.log_artifact(path, f"attack/{label}")
        for point in attacked.points:  # one run per attack: every model's metrics after it, side by side
            with tracker.run(f"attack-{point}", nested=True, tags={"attack": point}):
                tracker.log_metrics({f"{label}.{k}": v for label, r in attacked.results.items()
                                     for k, v in r["points"][point]["metrics"].items()})
    return evals, call.states, attacked


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "report"


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


def write_report(out: Path, title: str, by_seed: SeedEvals, tracker: NullTracker, states: dict[str, str],
                 references: tuple[str, ...] = (), attacked: SeedAttacks | None = None) -> dict[str, Any]:
    """report.md, tradeoff.png and report.json under `out`, logged to MLflow and published as Prefect artifacts:
    per model the median and range over the seeds, the best model by medians, the oracles' noise floor, and
    with attacks the robustness section and robustness.png."""
    def per_seed(value: Callable[[stages.ModelEval], Any]) -> dict[str, dict[str, Any]]:
        return {str(seed): {label: value(r) for label, r in evals.items()} for seed, evals in by_seed.items()}

    summary = summarise({seed: {label: r.metrics for label, r in evals.items()} for seed, evals in by_seed.items()})
    best, why = best_model(medians(summary), exclude=("target", "oracle", *references))
    oracles = {seed: evals["oracle"].result["per_example"].get("forget_truth_ratio") for seed, evals in by_seed.items()
               if "oracle" in evals}
    floor = noise_floor({s: tr for s, tr in oracles.items() if tr is not None})
    out.mkdir(parents=True, exist_ok=True)
    plot = tradeoff_plot(summary, out / "tradeoff.png", title=title, floor=floor)
    table = results_table(summary, table_columns(summary))
    text = report_markdown(title, list(by_seed), table, best, why, floor)
    robust = robustness(out, title, summary, attacked or {}, exclude=("target", "oracle", *references))
    if robust:
        text += "\n" + robust["markdown"]
    plots = f"Plot: {plot}\n" + (f"Robustness plot: {robust['plot']}\n" if robust else "")
    (out / "report.md").write_text(f"{text}\n{plots}")
    tracker.set_description(f"{text}\n{plots}")
    link, command = tracker.run_url(), ui_command(getattr(tracker, "uri", ""))
    report = {"title": title, "table": table, "best": best, "why": why, "plot": str(plot),
              "seeds": list(by_seed), "metrics": medians(summary),
              "spread": {label: {k: [v.low, v.high] for k, v in m.items()} for label, m in summary.items()},
              "per_seed": per_seed(lambda r: r.metrics), "noise_floor": floor,
              "eval": per_seed(lambda r: str(r.eval_dir / "eval.json")), "models": per_seed(lambda r: str(r.path)),
              "stages": states, "mlflow_run": link, "mlflow_compare": tracker.compare_url(),
              "mlflow_ui": command if link else None,
              "robustness": robust or None}
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    for name in ("report.md", "report.json"):
        tracker.log_artifact(out / name)
    tracker.log_artifact(plot)
    if robust:
        tracker.log_artifact(Path(robust["plot"]))
    key = artifact_key(title)
    create_markdown_artifact(text, key=f"{key}-results",
                             description="forget quality, model utility, forget probability and ROUGE, privacy leak")
    if link:
        create_link_artifact(link, link_text="MLflow run", key=f"{key}-mlflow",
                             description=f"the MLflow parent run (local store: `{command}` to browse)" if command
                             else "the MLflow parent run")
    return report


def robustness(out: Path, title: str, plain: dict[str, dict[str, Any]], attacked: SeedAttacks,
               exclude: tuple[str, ...]) -> dict[str, Any] | None:
    """The robustness section (markdown), plot and medians over seeds of the attack results, or None."""
    if not attacked:
        return None
    summary, points, chance = summarise_attacks(attacked)
    plot = robustness_plot(summary, plain, points, out / "robustness.png", f"{title}: forget quality after "
                           "each attack, vs the attacked oracle")
    groups = survival_groups(points)
    return {"markdown": robustness_markdown(summary, plain, points, chance, exclude), "plot": str(plot),
            "points": points, "metrics": medians(summary),
            "spread": {label: {k: [v.low, v.high] for k, v in m.items()} for label, m in summary.items()},
            "per_seed": {str(seed): {label: a.metrics(label) for label in a.results} for seed, a in attacked.items()},
            "attack": {str(seed): {label: str(p) for label, p in a.paths.items()} for seed, a in attacked.items()},
            "survivors": {name: survivors(summary, group, exclude) for name, group in groups.items() if group}}


def register(cfg: ExperimentConfig, by_seed: SeedEvals, best: str | None, tracker: NullTracker
             ) -> dict[str, str]:
    """Target, oracle and the report's best model in the Model Registry, under aliases of those names (with
    several seeds, the models of the first)."""
    if not cfg.tracking.register_models:
        return {}
    evals = next(iter(by_seed.values()))
    name = cfg.tracking.registered_model or cfg.name
    versions = {}
    picks = {"target": "target", "oracle": "oracle", **({"best": best} if best else {})}
    for alias, label in picks.items():
        if label in evals:
            r = evals[label]
            version = tracker.register_model(r.path, name, [alias], tags={"label": label, "identity": r.result[
                "identity"], "data_fingerprint": r.result["data_fingerprint"]})
            if version:
                versions[alias] = version
    return versions


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


# --- the sweep -----------------------------------------------------------------------------------------------


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2` strings → {key: [values]}; values are YAML, so `merge.lambdas=[1,2],[5]` gives two lists."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise UserError(f"--grid {item!r}: write KEY=V1,V2,... e.g. train.lr=1e-4,5e-4")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as e:
            raise UserError(f"--grid {item!r}: the values are not a YAML list: {e}") from e
        if key in grid:
            raise UserError(f"--grid names {key} twice; give all its values in one KEY=V1,V2")
        grid[key] = [_number(v) for v in values]
    return grid


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as text; a grid value that is a plain number is a number."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _set_by_every_method(config: dict[str, Any], key: str) -> bool:
    """Whether `key` (train.…) is overridden by every `methods` entry, so the train section's value is unused."""
    entries = config.get("methods") or []
    if not key.startswith("train.") or not entries:
        return False

    def sets(entry: Any) -> bool:
        node = entry.get("train") if isinstance(entry, dict) else None
        for part in key.split(".")[1:]:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return all(sets(e) for e in entries)


def grid_points(config: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, ExperimentConfig]:
    """Point label → validated config, for every combination of the grid; every point's problems at once."""
    check_method_overrides(config, [f"{k}=" for k in grid], "the config")
    shadowed = [k for k in grid if _set_by_every_method(config, k)]
    if shadowed:
        raise UserError(f"--grid {shadowed[0]}: every `methods` entry sets its own value, so sweeping the train "
                        "section's changes nothing; sweep whole lists instead, e.g. "
                        "'methods=[{name: npo, train: {lr: 1.0e-4}}],[{name: npo, train: {lr: 5.0e-4}}]'")
    points, problems = {}, []
    for combo in itertools.product(*grid.values()):
        overrides = [f"{k}={json.dumps(v)}" for k, v in zip(grid, combo, strict=True)]
        label = ",".join(f"{k}={json.dumps(v)}" for k, v in zip(grid, combo, strict=True))
        try:
            points[label] = validate_config(apply_overrides(config, overrides))
        except UserError as e:
            problems += [f"grid point {label}: {p}" for p in e.problems]
    raise_if(problems)
    return points


@flow(name="unlearning-sweep")
def sweep(config: dict[str, Any] | str, grid: dict[str, list[Any]], overrides: list[str] | None = None
          ) -> dict[str, Any]:
    """The pipeline at every point of `grid` (key → values) under one MLflow parent run, one combined report.

    The points share the output directory, so stages they have in common (data, target, oracle, and any
    unlearning run a point does not change) run once. A model shared by every point is one row of the
    report; the others are labelled `label [point]`.
    """
    if not grid:
        raise UserError("the sweep has no grid; pass --grid KEY=V1,V2 (e.g. train.lr=1e-4,5e-4)")
    config = resolve(config, overrides)
    points = grid_points(config, grid)
    base = validate_config(config)
    tracker = tracker_for(base.tracking.uri, base.tracking.experiment or base.name)
    results: dict[str, SeedEvals] = {}
    states: dict[str, str] = {}
    with tracker.run(f"{base.name}-sweep", tags={**run_tags(), "sweep_grid": json.dumps(grid)}):
        tracker.log_params({"sweep.grid": json.dumps(grid), **flatten(base.to_dict())})
        for label, cfg in points.items():
            with tracker.run(label, nested=True):
                tracker.log_params(flatten(cfg.to_dict()))
                results[label], point_states, _ = run_seeds(cfg, tracker)  # a sweep reports no attacks
            states.update({f"{s} [{label}]": v for s, v in point_states.items()})
        seeds = list(dict.fromkeys(seed for by_seed in results.values() for seed in by_seed))
        combined = {seed: combine({point: by_seed[seed] for point, by_seed in results.items() if seed in by_seed})
                    for seed in seeds}
        out = base.out / "sweep" / content_hash(grid, sorted(points))
        report = write_report(out, f"{base.name} sweep", combined, tracker, states)
        report["points"] = list(points)
    return report


def combine(results: dict[str, dict[str, stages.ModelEval]]) -> dict[str, stages.ModelEval]:
    """One row per distinct evaluation: a model every point shares keeps its label, others get `[point]`."""
    dirs: dict[str, set[Path]] = {}
    for evals in results.values():
        for label, r in evals.items():
            dirs.setdefault(label, set()).add(r.eval_dir)
    combined: dict[str, stages.ModelEval] = {}
    for point, evals in results.items():
        for label, r in evals.items():
            shared = len(dirs[label]) == 1 and all(label in e for e in results.values())
            combined[label if shared else f"{label} [{point}]"] = r
    return combined
