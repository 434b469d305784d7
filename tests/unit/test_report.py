"""The report's table, pick and plot on hand-made metrics."""

from __future__ import annotations

import pytest

from unlearning.evaluate.report import (
    COLUMNS,
    Spread,
    best_model,
    format_spread,
    medians,
    noise_floor,
    plot_axes,
    results_table,
    summarise,
    table_columns,
    tradeoff_plot,
)

MODELS = {
    "target": {"forget_quality": 1e-11, "model_utility": 0.80, "forget_probability": 0.96},
    "oracle": {"forget_quality": None, "model_utility": 0.81, "forget_probability": 0.20},
    "npo": {"forget_quality": 0.02, "model_utility": 0.75, "forget_probability": 0.40},  # keeps 93.75 %
    "ga": {"forget_quality": 0.30, "model_utility": 0.50, "forget_probability": 0.05},  # keeps 62.5 %
    "merged_l5": {"forget_quality": 2e-10, "model_utility": 0.79, "forget_probability": 0.74},
}


def test_table_has_a_row_per_model_and_marks_unavailable_values():
    table = results_table(summarise({0: MODELS}), ("forget_quality", "model_utility"))
    lines = table.splitlines()
    assert lines[0] == "| model | forget_quality | model_utility |" and len(lines) == 2 + len(MODELS)
    assert "| oracle | n/a | 0.810 |" in lines and "| target | 1.00e-11 | 0.800 |" in lines


def test_the_table_adds_the_accuracy_on_each_set_scored_as_a_choice():
    models = {"target": {**MODELS["target"], "real_authors_accuracy": 0.41, "retain_probability": 0.9},
              "npo": {**MODELS["npo"], "real_authors_accuracy": 0.38, "world_facts_accuracy": None}}
    columns = table_columns(summarise({0: models}))
    # world facts: unavailable everywhere, no column; nor ROUGE or PrivLeak, which no model has here
    assert columns == ("forget_quality", "model_utility", "forget_probability", "real_authors_accuracy")
    assert results_table(summarise({0: models}), columns).splitlines()[-1].endswith("| 0.380 |")
    full = {label: {c: 0.5 for c in COLUMNS} for label in ("target", "npo")}
    assert table_columns(summarise({0: full})) == COLUMNS


def test_a_text_benchmark_shows_verbmem_and_knowmem_instead_of_the_qa_columns():
    """No truth ratios, no answers asked: forget quality and ROUGE are n/a for every model and left out; the
    multiple-choice accuracies follow, lm-eval's own not repeated."""
    text = {label: {"forget_quality": None, "forget_rouge": None, "model_utility": 0.3, "forget_probability": 0.9,
                    "privleak": -10.0, "forget_verbmem": 0.9, "retain_verbmem": 0.95, "forget_qa_knowmem": 0.1,
                    "forget_choice_acc": 0.6, "lm_eval_forget_choice_acc": 0.6} for label in ("target", "npo")}
    assert table_columns(summarise({0: text})) == ("model_utility", "forget_probability", "privleak", "forget_verbmem",
                                                   "retain_verbmem", "forget_qa_knowmem", "forget_choice_acc")


def test_over_seeds_the_table_gives_the_median_and_range_and_the_pick_uses_medians():
    """Three seeds of npo: forget quality 0.2, 0.01, 0.6 → median 0.2, range [0.01, 0.6]; a value missing at one
    seed is left out of its spread. The pick compares medians: npo's 0.2 beats merged_l5's median 1e-5."""
    def seed(fq_npo, fq_merged, mu_npo=0.75):
        return {**MODELS, "npo": {**MODELS["npo"], "forget_quality": fq_npo, "model_utility": mu_npo},
                "merged_l5": {**MODELS["merged_l5"], "forget_quality": fq_merged}}

    summary = summarise({0: seed(0.2, 1e-5), 1: seed(0.01, 0.3), 2: seed(0.6, None, 0.74)})
    npo = summary["npo"]["forget_quality"]
    assert (npo.median, npo.low, npo.high) == (0.2, 0.01, 0.6) and npo.values == (0.2, 0.01, 0.6)
    merged = summary["merged_l5"]["forget_quality"]
    assert merged.median == pytest.approx((1e-5 + 0.3) / 2) and merged.values[2] is None
    assert format_spread(npo) == "0.200 [0.010, 0.600]"
    assert "| npo | 0.200 [0.010, 0.600] | 0.750 [0.740, 0.750] |" in results_table(
        summary, ("forget_quality", "model_utility"))
    assert best_model(medians(summary))[0] == "npo"
    assert format_spread(Spread.of([None, None])) == "n/a"


def test_the_noise_floor_is_the_oracles_forget_quality_against_each_other():
    """Oracles at seeds 0 and 1 with identical truth ratios: p = 1; seed 2 fully separated from both
    (3 vs 3 items): the exact two-sided p-value 0.1 (see test_metrics.test_ks_pvalue_exact)."""
    floor = noise_floor({0: [1.0, 2.0, 3.0], 1: [1.0, 2.0, 3.0], 2: [4.0, 5.0, 6.0]})
    assert floor == pytest.approx({"0-1": 1.0, "0-2": 0.1, "1-2": 0.1})
    assert noise_floor({0: [1.0, 2.0]}) == {}


def test_best_model_keeps_ninety_percent_of_the_target_utility():
    """0.9 × 0.80 = 0.72: npo (0.75) and merged_l5 (0.79) qualify, ga (0.50) does not; npo forgets best."""
    label, why = best_model(MODELS)
    assert label == "npo" and "90%" in why
    # Without npo nothing but merged_l5 keeps the utility; without both, the best FQ × utility wins.
    assert best_model({k: v for k, v in MODELS.items() if k != "npo"})[0] == "merged_l5"
    label, why = best_model({k: v for k, v in MODELS.items() if k in ("target", "ga")})
    assert label == "ga" and "no model keeps" in why
    assert best_model({"target": MODELS["target"]})[0] is None


def test_plot_is_written(tmp_path):
    path = tradeoff_plot(summarise({0: MODELS, 1: MODELS}), tmp_path / "plots" / "tradeoff.png",
                         floor={"0-1": 0.4, "0-2": 0.9})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_the_plot_takes_the_benchmarks_own_axes_where_there_is_no_forget_quality():
    """TOFU: forget quality against utility. A multiple-choice benchmark: the forgotten domain's accuracy against
    the kept one's; a text benchmark: VerbMem on forget against retain. The oracle alone having a value does not
    choose the axes."""
    assert plot_axes(summarise({0: MODELS}))[:2] == ("model_utility", "forget_quality")
    text = {"target": {"forget_quality": None, "forget_verbmem": 1.0, "retain_verbmem": 0.99},
            "npo": {"forget_quality": None, "forget_verbmem": 0.2, "retain_verbmem": 0.98}}
    assert plot_axes(summarise({0: text}))[:2] == ("retain_verbmem", "forget_verbmem")
    choice = {label: {**m, "forget_choice_acc": 0.5, "retain_choice_acc": 0.6} for label, m in text.items()}
    assert plot_axes(summarise({0: choice}))[:3] == ("retain_choice_acc", "forget_choice_acc", False)
    only_oracle = {"oracle": {"forget_verbmem": 0.1, "retain_verbmem": 0.9}, "npo": {"forget_quality": None}}
    assert plot_axes(summarise({0: only_oracle}))[1] == "forget_quality"


def test_references_are_shown_but_never_picked():
    """A base model never trained on the forget set has a high forget quality; as a reference it is not the pick."""
    models = {**MODELS, "base": {"forget_quality": 0.9, "model_utility": 0.8, "forget_probability": 0.2}}
    assert best_model(models)[0] == "base"
    assert best_model(models, exclude=("target", "oracle", "base"))[0] == "npo"
