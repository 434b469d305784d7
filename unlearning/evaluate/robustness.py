"""The robustness section of the report: every model's forgetting after each attack, over seeds.

Pure functions of the attack stage's results (`Attacked.metrics`: `<point>/<metric>` per label) and the
plain evaluation's metrics, so the CLI and the flow print and plot the same thing. Forget quality after
an attack is measured against the oracle after the same attack ("robust forget quality").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearning.evaluate.attacks import point_kind
from unlearning.evaluate.report import Spread, format_spread, summarise

Summary = Mapping[str, Mapping[str, Spread]]  # label → metric → spread over seeds

KEEPS = 0.01  # "keeps its forgetting": forget quality above this after the attack
TABLES = (  # (metric, heading, which points carry it)
    ("forget_quality", "Robust forget quality: KS p-value of forget truth ratios against the oracle after the "
                       "same attack (higher: closer to never having seen the forget set)", "all"),
    ("forget_probability", "Forget probability after the attack (relearn: the held-out half)", "all"),
    ("forget_rouge", "Forget ROUGE-L recall after the attack", "all"),
    ("forget_accuracy", "Forget accuracy as a choice (chance in the header)", "choice"),
    ("retain_probability", "Utility after the attack: retain probability", "weights"),
)


def _applies(point: str, which: str) -> bool:
    kind, _ = point_kind(point)
    return which == "all" or (which == "choice" and kind in ("choice", "cloze")) or (
        which == "weights" and kind in ("relearn", "quantize"))


def point_table(attacked: Summary, plain: Summary, metric: str, points: Sequence[str],
                chance: Mapping[str, float] | None = None) -> str:
    """A markdown table: one row per model, the plain evaluation's value then one column per attack point
    (median [min, max] over seeds)."""
    has_plain = any(metric in plain.get(label, {}) for label in attacked)
    header = ["model", *(["plain"] if has_plain else []),
              *(f"{p} (chance {chance[p]:.2f})" if chance and p in chance else p for p in points)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m in attacked.items():
        cells = [label, *([format_spread(plain.get(label, {}).get(metric))] if has_plain else []),
                 *(format_spread(m.get(f"{p}/{metric}")) for p in points)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def survival_groups(points: Sequence[str]) -> dict[str, list[str]]:
    """The attack groups the report names the surviving methods of: every relearning (k > 0), 4-bit."""
    return {"every relearning": [p for p in points if point_kind(p)[0] == "relearn" and p != "relearn@0"],
            "4-bit quantization": [p for p in points if p in ("quantize:nf4", "quantize:fp4")]}


def summarise_attacks(by_seed: Mapping[int, Any]) -> tuple[dict[str, dict[str, Spread]], list[str], dict[str, float]]:
    """seed → the attack stage's `Attacked`, to (label → `<point>/<metric>` → spread over the seeds, the points,
    point → chance accuracy of the choice formats)."""
    summary = summarise({seed: {label: a.metrics(label) for label in a.results} for seed, a in by_seed.items()})
    first = next(iter(by_seed.values()))
    chance = {p: v for r in first.results.values() for p in first.points
              if (v := r["points"][p]["metrics"].get("chance_accuracy")) is not None}
    return summary, list(first.points), chance


def survivors(attacked: Summary, points: Sequence[str], exclude: Sequence[str] = ("target", "oracle"),
              threshold: float = KEEPS) -> list[str]:
    """The labels whose median forget quality stays above `threshold` at every one of `points`."""
    return [label for label, m in attacked.items() if label not in exclude and points and all(
        (s := m.get(f"{p}/forget_quality")) is not None and s.median is not None and s.median > threshold
        for p in points)]


def robustness_markdown(attacked: Summary, plain: Summary, points: Sequence[str], chance: Mapping[str, float],
                        exclude: Sequence[str] = ("target", "oracle")) -> str:
    """The report's robustness section: the tables of `TABLES` that have values, and which models keep forget
    quality above `KEEPS` after relearning and after 4-bit quantization."""
    lines = ["## Robustness: does the forgetting survive an attack?", ""]
    for metric, heading, which in TABLES:
        cols = [p for p in points if _applies(p, which) and any(f"{p}/{metric}" in m for m in attacked.values())]
        if cols:
            lines += [f"{heading}:", "", point_table(attacked, plain, metric, cols,
                                                     chance if metric == "forget_accuracy" else None), ""]
    for name, group in survival_groups(points).items():
        if group:
            kept = survivors(attacked, group, exclude)
            lines.append(f"- Forget quality > {KEEPS:g} after {name} ({', '.join(group)}): "
                         f"{', '.join(kept) if kept else 'no method'}.")
    return "\n".join(lines) + "\n"


def robustness_plot(attacked: Summary, plain: Summary, points: Sequence[str], path: Path, title: str = "") -> Path:
    """A heatmap of log10 median forget quality, models × (plain, attack points), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(attacked)
    columns = ["plain", *points]

    def value(label: str, column: str) -> float:
        s = (plain.get(label, {}).get("forget_quality") if column == "plain"
             else attacked[label].get(f"{column}/forget_quality"))
        return math.nan if s is None or s.median is None else max(s.median, 1e-300)

    grid = np.array([[value(label, c) for c in columns] for label in labels])
    logs = np.log10(grid)
    fig, ax = plt.subplots(figsize=(1.2 + 0.95 * len(columns), 1.0 + 0.45 * len(labels)))
    finite = logs[np.isfinite(logs)]
    low = float(min(finite.min(), -3)) if finite.size else -3.0
    image = ax.imshow(np.where(np.isfinite(logs), logs, np.nan), cmap="RdYlGn", vmin=low, vmax=0, aspect="auto")
    for i in range(len(labels)):
        for j in range(len(columns)):
            text = "n/a" if math.isnan(grid[i, j]) else f"{grid[i, j]:.2g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="log10 forget quality vs attacked oracle")
    ax.set_title(title or "Forget quality after each attack", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
