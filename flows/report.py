"""The pipeline's report: report.md, tradeoff.png and report.json from every seed's evaluations (medians and
ranges), logged to MLflow and published as Prefect artifacts; the robustness section when models were
attacked; the Model Registry entries of target, oracle and best model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from unlearning import stages
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
from unlearning.outputs import write_atomic
from unlearning.schema import ExperimentConfig
from unlearning.tracking import NullTracker, ui_command

SeedEvals = dict[int, dict[str, stages.ModelEval]]  # seed → label → evaluation
SeedAttacks = dict[int, stages.Attacked]  # seed → the attack stage's results (configs with attack.attacks)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "report"


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
    context = [label for label, r in next(iter(by_seed.values())).items() if r.in_context]
    text = report_markdown(title, list(by_seed), table, best, why, floor, context)
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
        if label in evals and not evals[label].in_context:  # an in-context pick has no weights of its own
            r = evals[label]
            version = tracker.register_model(r.path, name, [alias], tags={"label": label, "identity": r.result[
                "identity"], "data_fingerprint": r.result["data_fingerprint"]})
            if version:
                versions[alias] = version
    return versions


