"""The report: a table of every evaluated model and the forget-quality vs model-utility plot.

Pure functions of the models' eval.json metrics (label → {metric: value or None}), so the CLI, the Prefect
flow and the sweep all print and plot the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Metrics = Mapping[str, float | None]

COLUMNS = ("forget_quality", "model_utility", "forget_probability", "forget_rouge", "privleak")
UTILITY_KEPT = 0.9  # the best model keeps at least this fraction of the target's utility


def format_value(v: float | None) -> str:
    """A metric as the report and the CLI print it: n/a when unavailable, scientific when tiny."""
    if v is None:
        return "n/a"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.3f}"


def results_table(models: Mapping[str, Metrics], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table, one row per model, one column per metric (n/a where a metric is unavailable)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, m in models.items():
        lines.append(f"| {label} | " + " | ".join(format_value(m.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def best_model(models: Mapping[str, Metrics], reference: str = "target",
               exclude: tuple[str, ...] = ("target", "oracle")) -> tuple[str | None, str]:
    """The report's pick: the highest forget quality among models keeping ≥ 90 % of the reference's
    model utility; if none does, the highest forget quality × utility ratio. Returns (label, why)."""
    ref = models.get(reference, {}).get("model_utility")
    scored: list[tuple[str, float, float]] = []
    for label, m in models.items():
        fq, mu = m.get("forget_quality"), m.get("model_utility")
        if label not in exclude and fq is not None and mu is not None and math.isfinite(fq) and math.isfinite(mu):
            scored.append((label, fq, mu))
    if not scored or not ref:
        return None, "no candidate has both forget quality and model utility (or the reference has no utility)"
    keeping = [(label, fq) for label, fq, mu in scored if mu >= UTILITY_KEPT * ref]
    if keeping:
        return max(keeping, key=lambda x: x[1])[0], (
            f"highest forget quality among models keeping ≥ {UTILITY_KEPT:.0%} of {reference}'s utility")
    label = max(scored, key=lambda x: x[1] * x[2])[0]
    return label, f"no model keeps {UTILITY_KEPT:.0%} of {reference}'s utility; best forget quality × utility"


def tradeoff_plot(models: Mapping[str, Metrics], path: Path, title: str = "") -> Path:
    """Forget quality (log scale) against model utility, target and oracle marked; saved as PNG.

    The oracle has no forget quality against itself; it is drawn at 1, the value of a model that is
    indistinguishable from it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for label, m in models.items():
        fq, mu = m.get("forget_quality"), m.get("model_utility")
        if label == "oracle" and fq is None:
            fq = 1.0
        if fq is None or mu is None:
            continue
        style = {"target": ("X", "tab:red", 120), "oracle": ("*", "tab:green", 180)}.get(label, ("o", "tab:blue", 50))
        ax.scatter(mu, max(fq, 1e-300), marker=style[0], color=style[1], s=style[2], zorder=3)
        ax.annotate(label, (mu, max(fq, 1e-300)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_yscale("log")
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    ax.text(ax.get_xlim()[0], 0.05, " p = 0.05", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value vs oracle (log)")
    ax.set_title(title or "Forgetting vs utility")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def sequence_plot(ledger: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Sequential unlearning against the number of requests applied (0: the target): left, each request's
    forget probability (dotted before it is applied); right, model utility and forget quality (log) on
    everything forgotten so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [ledger["before"], *ledger["applied"]]
    xs = list(range(len(points)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, request in enumerate(ledger["requests"]):
        key = str(request["request"])
        ys = [p["per_request"][key]["forget_probability"] for p in points]
        color = f"C{i % 10}"
        applied_from = request["request"]
        left.plot(xs[: applied_from + 1], ys[: applied_from + 1], linestyle=":", color=color)
        left.plot(xs[applied_from:], ys[applied_from:], marker="o", color=color, label=f"request {key}")
    left.set_xlabel("requests applied")
    left.set_ylabel("forget probability of the request's items")
    left.set_xticks(xs)
    left.legend(fontsize=7)
    left.grid(True, alpha=0.3)
    right.plot(xs, [p["model_utility"] for p in points], marker="o", color="tab:blue", label="model utility")
    right.set_xlabel("requests applied")
    right.set_ylabel("model utility", color="tab:blue")
    right.set_xticks(xs)
    fq_axis = right.twinx()
    fq_axis.plot(xs, [max(p["forget_quality"] or 1e-300, 1e-300) for p in points], marker="s", color="tab:red",
                 label="forget quality (so far)")
    fq_axis.set_yscale("log")
    fq_axis.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
    fq_axis.set_ylabel("forget quality on all requests so far (log)", color="tab:red")
    fig.suptitle(title or "Sequential unlearning")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ledger_table(ledger: Mapping[str, Any]) -> str:
    """The sequence ledger as a markdown table: one row per number of requests applied (0: the target); the
    entities' names are in the ledger."""
    requests = [str(r["request"]) for r in ledger["requests"]]
    lines = ["| requests applied | entities forgotten | forget quality (so far) | model utility | "
             "forget probability (so far) | " + " | ".join(f"p(request {r})" for r in requests) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(requests)]
    for n, point in enumerate([ledger["before"], *ledger["applied"]]):
        entities = f"{len(point['entities'])} ({point['items']} items)" if "entities" in point else "(target)"
        probs = [format_value(point["per_request"][r]["forget_probability"])
                 + ("" if point["per_request"][r]["applied"] else "*") for r in requests]
        lines.append(f"| {n} | {entities} | {format_value(point['forget_quality'])} | "
                     f"{format_value(point['model_utility'])} | {format_value(point['forget_probability'])} | "
                     + " | ".join(probs) + " |")
    return "\n".join(lines) + "\n\n\\* not yet requested at that point (collateral change)"
