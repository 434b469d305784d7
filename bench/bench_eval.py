"""Evaluation benchmark: our batched probes vs a per-example baseline, side by side on the same models.

For each model (the demo's target and oracle by default), both sides probe every prepared split:

1. Loss-based metrics: the teacher-forced scores behind probability, truth ratio, forget quality, MIA,
   PrivLeak, ES/EM (answer, paraphrased answer, each perturbed answer, paraphrased question). Ours:
   length-sorted batches, each distinct sequence scored once. Baseline: one unpadded forward per
   sequence (unlearning/evaluate/naive.py). Target: ours ≥ 5× faster.
2. Generation: greedy answers to the questions and paraphrased questions (ROUGE, KnowMem). Ours:
   left-padded batches; baseline: one `generate` per prompt. Target: ≥ 2× faster.

The metrics computed from both sides' probes must agree (printed: the largest difference of any
aggregate but the MIA AUCs; for those, how many member/non-member pairs swapped order, since scores
equal to ~1e-7 may; and how many generations differ).

    .venv/bin/python bench/bench_eval.py [--config configs/demo.yaml] [--repeats 2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the fastest counts")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from unlearning.cli import _quiet_libraries
    from unlearning.config import load_config
    from unlearning.data.encoders import QAEncoder
    from unlearning.evaluate.naive import probe_split_naive
    from unlearning.evaluate.probes import probe_split
    from unlearning.evaluate.runner import compute_metrics
    from unlearning.evaluate.suites import get_suite
    from unlearning.models import build_models, load_causal_lm
    from unlearning.stages import prepare

    _quiet_libraries()
    cfg = load_config(args.config, args.overrides)
    built, prepared = build_models(cfg), prepare(cfg)
    data, tok = prepared.splits(), prepared.tokenizer()
    splits = list(data)
    common = {"max_length": cfg.data.max_length, "max_new_tokens": cfg.eval.max_new_tokens}
    rows = {s: list(data[s]) for s in splits}

    def ours(model: Any, generations: bool) -> dict[str, Any]:
        encoder = QAEncoder(tok, cfg.data.template, cfg.data.max_length)
        return {s: probe_split(model, rows[s], encoder, batch_size=cfg.eval.batch_size, generations=generations,
                               max_new_tokens=cfg.eval.max_new_tokens, show_progress=False) for s in splits}

    def naive(model: Any, generations: bool) -> dict[str, Any]:
        return {s: probe_split_naive(model, rows[s], tok, cfg.data.template, generations=generations, **common)
                for s in splits}

    report: dict[str, Any] = {}
    for label, path in (("target", built.target), ("oracle", built.oracle)):
        model = load_causal_lm(path, cfg.model.dtype).eval()
        best = {k: float("inf") for k in ("ours_scores", "base_scores", "ours_total", "base_total")}
        for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both sides
            p_ours, t = timed(lambda m=model: ours(m, False))
            best["ours_scores"] = min(best["ours_scores"], t)
            p_base, t = timed(lambda m=model: naive(m, False))
            best["base_scores"] = min(best["base_scores"], t)
            g_ours, t = timed(lambda m=model: ours(m, True))
            best["ours_total"] = min(best["ours_total"], t)
            g_base, t = timed(lambda m=model: naive(m, True))
            best["base_total"] = min(best["base_total"], t)
        # Generation time = a full run minus its scoring-only run.
        gen_ours = best["ours_total"] - best["ours_scores"]
        gen_base = best["base_total"] - best["base_scores"]
        # Every metric of the tofu suite from each side's probes (those that need the oracle's eval are
        # left out: they compare two models, and the probes they read are the ones compared here).
        suite = get_suite("tofu").metrics
        m_ours = compute_metrics(g_ours, suite, oracle=None, is_oracle=False, utility_splits=("world_facts",))
        m_base = compute_metrics(g_base, suite, oracle=None, is_oracle=False, utility_splits=("world_facts",))
        diffs = [abs(a.value - m_base[k].value) for k, a in m_ours.items()
                 if a.value is not None and not k.startswith("mia_")]
        # An AUC moves in steps of 1/(members·non-members): a pair whose scores tie to ~1e-7 can swap.
        pairs = len(rows["forget"]) * len(rows["holdout"])
        flips = max(round(abs(a.value - m_base[k].value) * pairs) for k, a in m_ours.items() if k.startswith("mia_"))
        gen_diff = sum(a != b for s in splits for a, b in zip(g_ours[s].generation, g_base[s].generation, strict=True))
        n_seq = sum(len(r) for r in rows.values())
        report[label] = {**best, "gen_ours": gen_ours, "gen_base": gen_base,
                         "score_ratio": best["base_scores"] / best["ours_scores"], "gen_ratio": gen_base / gen_ours,
                         "max_metric_diff": max(diffs), "auc_pairs_swapped": flips, "auc_pairs": pairs,
                         "generations_differing": gen_diff, "items": n_seq}
        del p_ours, p_base

    print(f"\n{args.config}: {sum(len(r) for r in rows.values())} items over {splits}, eval.batch_size "
          f"{cfg.eval.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats} alternating runs")
    print(f"{'model':<8}{'scores ours s':>14}{'baseline s':>12}{'ratio':>8}{'gen ours s':>12}{'baseline s':>12}"
          f"{'ratio':>8}{'max |Δ metric|':>16}{'AUC pairs swapped':>19}{'gen differ':>12}")
    for label, r in report.items():
        print(f"{label:<8}{r['ours_scores']:>14.2f}{r['base_scores']:>12.2f}{r['score_ratio']:>7.1f}x"
              f"{r['gen_ours']:>12.2f}{r['gen_base']:>12.2f}{r['gen_ratio']:>7.1f}x{r['max_metric_diff']:>16.1e}"
              f"{r['auc_pairs_swapped']:>11d} of {r['auc_pairs']:<5d}{r['generations_differing']:>12d}")
    (cfg.out / "bench-eval.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
