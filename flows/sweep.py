"""The sweep flow: the pipeline at every point of a grid of config values, under one MLflow parent run, with
one combined report. The points share the output directory, so the stages they have in common run once."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import SeedEvals, resolve, run_seeds, run_tags
from flows.report import write_report
from unlearning import stages
from unlearning.config import apply_overrides, check_method_overrides, validate_config
from unlearning.errors import UserError, raise_if
from unlearning.hashing import content_hash
from unlearning.schema import ExperimentConfig
from unlearning.tracking import flatten, tracker_for


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
