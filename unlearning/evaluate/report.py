"""The report: a table of every evaluated model and the forget-quality vs model-utility plot, over seeds.

Pure functions of the models' eval.json metrics, so the CLI, the Prefect flow and the sweep all print and
plot the same thing. A run repeated over seeds gives, per model, the median and the range (min–max) of every
metric (`Spread`); the best-model rule is applied to the medians, and the oracles of different seeds against
one another give the noise floor of forget quality: how far two models that both never saw the forget set
fall apart by chance alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Metrics = Mapping[str, float | None]

COLUMNS = ("forget_quality", "model_utility", "forget_probability", "forget_rouge", "privleak")
UTILITY_KEPT = 0.9  # the best model keeps at least this fraction of the target's utility


@dataclass(frozen=True)
class Spread:
    """One metric of one model over the seeds it was evaluated at: the median, the min and max, and the values
    (None where unavailable at that seed)."""

    median: float | None
    low: float | None
    high: float | None
    values: tuple[float | None, ...]

    @staticmethod
    def of(values: Sequence[float | None]) -> Spread:
        known = [v for v in values if v is not None and math.isfinite(v)]
        if not known:
            return Spread(None, None, None, tuple(values))
        return Spread(float(np.median(known)), min(known), max(known), tuple(values))


def summarise(by_seed: Mapping[int, Mapping[str, Metrics]]) -> dict[str, dict[str, Spread]]:
    """seed → label → metrics, to label → metric → `Spread` over the seeds (labels in order of appearance)."""
    labels = list(dict.fromkeys(label for models in by_seed.values() for label in models))
    out: dict[str, dict[str, Spread]] = {}
    for label in labels:
        names = list(dict.fromkeys(k for models in by_seed.values() for k in models.get(label, {})))
        out[label] = {k: Spread.of([models.get(label, {}).get(k) for models in by_seed.values()]) for k in names}
    return out


def medians(summary: Mapping[str, Mapping[str, Spread]]) -> dict[str, dict[str, float | None]]:
    """label → metric → median over the seeds."""
    return {label: {k: s.median for k, s in m.items()} for label, m in summary.items()}


def format_value(v: float | None) -> str:
    """A metric as the report and the CLI print it: n/a when unavailable, scientific when tiny."""
    if v is None:
        return "n/a"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.3f}"


def format_spread(s: Spread | None) -> str:
    """The median, and with several seeds its range: `0.513 [0.201, 0.774]`."""
    if s is None or s.median is None:
        return "n/a"
    if len(s.values) < 2:
        return format_value(s.median)
    return f"{format_value(s.median)} [{format_value(s.low)}, {format_value(s.high)}]"


# MUSE's memorisation metrics, shown where the data has them: VerbMem on text splits, KnowMem on QA.
MUSE_COLUMNS = ("forget_verbmem", "retain_verbmem", "forget_knowmem", "forget_qa_knowmem", "retain_knowmem",
                "retain_qa_knowmem")


def table_columns(summary: Mapping[str, Mapping[str, Spread]]) -> tuple[str, ...]:
    """The report's columns: COLUMNS that some model has (forget quality whenever the forget split has truth
    ratios, n/a for the oracle), MUSE's VerbMem and KnowMem where some model has them, then the accuracy on
    each set scored as a choice that some model has (TOFU's real authors and world facts: what the model knew
    before unlearning, which it should keep; a multiple-choice split's acc, WMDP's measure)."""
    present = {k for m in summary.values() for k, v in m.items() if v.median is not None}
    muse = tuple(k for k in MUSE_COLUMNS if k in present)
    extra = dict.fromkeys(k for m in summary.values() for k, v in m.items() if k.endswith(("_accuracy", "_acc"))
                          and not k.startswith("lm_eval_") and v.median is not None)
    # A text benchmark has no truth ratios or answers to ask: its forget quality and ROUGE columns would be n/a.
    headline = tuple(c for c in COLUMNS if c in present or (c in ("forget_quality", "model_utility")
                     and "forget_truth_ratio" in present))
    return headline + muse + tuple(extra)


def results_table(summary: Mapping[str, Mapping[str, Spread]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table, one row per model, one column per metric: the median over seeds and, with several
    seeds, [min, max]; n/a where a metric is unavailable."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, m in summary.items():
        lines.append(f"| {label} | " + " | ".join(format_spread(m.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def best_model(models: Mapping[str, Metrics], reference: str = "target",
               exclude: tuple[str, ...] = ("target", "oracle")) -> tuple[str | None, str]:
    """The report's pick (on medians over seeds): the highest forget quality among models keeping ≥ 90 % of the
    reference's model utility; if none does, the highest forget quality × utility ratio. Returns (label, why)."""
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


def noise_floor(oracle_truth_ratios: Mapping[int, Sequence[float]]) -> dict[str, float]:
    """Forget quality of each oracle against each other (seed pairs): KS p-values of their per-item forget truth
    ratios. Both never saw the forget set, so these values are what chance alone gives; a method inside this
    range cannot be told apart from retraining at this sample size. Returns `"i-j"` → p-value."""
    from unlearning.evaluate.metrics import ks_pvalue

    return {f"{i}-{j}": ks_pvalue(np.asarray(oracle_truth_ratios[i]), np.asarray(oracle_truth_ratios[j]))
            for i, j in itertools.combinations(sorted(oracle_truth_ratios), 2)}


def report_markdown(title: str, seeds: Sequence[int], table: str, best: str | None, why: str,
                    floor: Mapping[str, float], in_context: Sequence[str] = ()) -> str:
    """The report as markdown: the seeds, the table, which rows are in-context methods, the pick and, with
    several seeds, the noise floor."""
    several = " (median [min, max] over the seeds; forget quality against the oracle of the same seed)"
    lines = [f"# {title}", "", f"Seeds: {', '.join(map(str, seeds))}" + (several if len(seeds) > 1 else ""), "",
             table, ""]
    if in_context:
        lines += [f"In context (the target's weights, every question asked after the method's context): "
                  f"{', '.join(in_context)}.", ""]
    lines += [f"Best: {best} ({why})", ""]
    if floor:
        spread = format_spread(Spread.of(list(floor.values())))
        lines += [f"Noise floor: the oracles of different seeds score forget quality {spread} against each other "
                  f"({len(floor)} pairs): what two models that never saw the forget set score by chance alone.", ""]
    return "\n".join(lines)


# The plot's axes by benchmark: (x, y, log-scale y, x label, y label), the first whose y some unlearned model has.
PLOT_AXES = (
    ("model_utility", "forget_quality", True, "model utility (higher is better)",
     "forget quality, KS p-value vs oracle (log)"),
    ("retain_choice_acc", "forget_choice_acc", False, "kept domain's accuracy (higher is better)",
     "forgotten domain's accuracy (goal: chance)"),
    ("retain_verbmem", "forget_verbmem", False, "VerbMem on the retain corpus (higher is better)",
     "VerbMem on the forget corpus (goal: the oracle's)"),
)


def plot_axes(summary: Mapping[str, Mapping[str, Spread]]) -> tuple[str, str, bool, str, str]:
    """The axes of the trade-off plot: TOFU's forget quality against utility, else (a text or multiple-choice
    benchmark, no truth ratios) the forget split's accuracy or VerbMem against the retained one's."""
    def has(key: str) -> bool:
        return any(m.get(key) is not None and m[key].median is not None
                   for label, m in summary.items() if label != "oracle")

    return next((a for a in PLOT_AXES if has(a[0]) and has(a[1])), PLOT_AXES[0])


def tradeoff_plot(summary: Mapping[str, Mapping[str, Spread]], path: Path, title: str = "",
                  floor: Mapping[str, float] | None = None) -> Path:
    """Forget quality (log scale) against model utility, target and oracle marked; saved as PNG. With several
    seeds each point is the median and the bars span min to max, and the oracles' noise floor (`noise_floor`)
    is a band. A benchmark without truth ratios plots its forget split's accuracy or VerbMem against the
    retained one's instead (`plot_axes`).

    The oracle has no forget quality against itself; it is drawn at 1, the value of a model that is
    indistinguishable from it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key, log, x_label, y_label = plot_axes(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    tiny = 1e-300 if log else float("-inf")  # where a p-value of 0 is drawn on the log axis
    for label, m in summary.items():
        fq, mu = m.get(y_key), m.get(x_key)
        if label == "oracle" and y_key == "forget_quality" and (fq is None or fq.median is None):
            fq = Spread.of([1.0])
        if fq is None or mu is None or fq.median is None or mu.median is None:
            continue
        style = {"target": ("X", "tab:red", 120), "oracle": ("*", "tab:green", 180)}.get(label, ("o", "tab:blue", 50))
        y = max(fq.median, tiny)
        if len(mu.values) > 1 and mu.low is not None and mu.high is not None and fq.low is not None \
                and fq.high is not None:
            ax.errorbar(mu.median, y, xerr=[[mu.median - mu.low], [mu.high - mu.median]],
                        yerr=[[y - max(fq.low, tiny)], [max(fq.high, tiny) - y]], fmt="none", ecolor=style[1],
                        alpha=0.5, capsize=3, zorder=2)
        ax.scatter(mu.median, y, marker=style[0], color=style[1], s=style[2], zorder=3)
        ax.annotate(label, (mu.median, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if y_key == "forget_quality":
        ax.set_yscale("log")
        if floor:
            band = Spread.of(list(floor.values()))
            if band.low is not None and band.high is not None:
                ax.axhspan(max(band.low, tiny), max(band.high, tiny), color="tab:green", alpha=0.12, zorder=1,
                           label="oracle vs oracle (noise floor)")
                ax.legend(loc="lower left", fontsize=7)
        ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[0], 0.05, " p = 0.05", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    seeds = max((len(m[x_key].values) for m in summary.values() if x_key in m), default=1)
    ax.set_title((title or "Forgetting vs utility") + (f" (median, min–max over {seeds} seeds)" if seeds > 1 else ""))
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
