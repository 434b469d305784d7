"""The report's table, pick and plot on hand-made metrics."""

from __future__ import annotations

from unlearning.evaluate.report import best_model, results_table, tradeoff_plot

MODELS = {
    "target": {"forget_quality": 1e-11, "model_utility": 0.80, "forget_probability": 0.96},
    "oracle": {"forget_quality": None, "model_utility": 0.81, "forget_probability": 0.20},
    "npo": {"forget_quality": 0.02, "model_utility": 0.75, "forget_probability": 0.40},  # keeps 93.75 %
    "ga": {"forget_quality": 0.30, "model_utility": 0.50, "forget_probability": 0.05},  # keeps 62.5 %
    "merged_l5": {"forget_quality": 2e-10, "model_utility": 0.79, "forget_probability": 0.74},
}


def test_table_has_a_row_per_model_and_marks_unavailable_values():
    table = results_table(MODELS, ("forget_quality", "model_utility"))
    lines = table.splitlines()
    assert lines[0] == "| model | forget_quality | model_utility |" and len(lines) == 2 + len(MODELS)
    assert "| oracle | n/a | 0.810 |" in lines and "| target | 1.00e-11 | 0.800 |" in lines


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
    path = tradeoff_plot(MODELS, tmp_path / "plots" / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
