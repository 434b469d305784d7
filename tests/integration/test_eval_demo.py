"""On the demo's models, forget quality separates a model that knows the forget set from one that does not."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from unlearning.config import load_config
from unlearning.models import build_models
from unlearning.stages import evaluate


@pytest.mark.slow
def test_forget_quality_separates_the_target_from_a_second_oracle(tmp_path):
    """The target (trained on the forget set) against the oracle: p < 1e-3. A second oracle, same recipe
    but another initialisation and data-order seed, against the oracle: p > 0.05. ~5 minutes on 2 cores
    (three models of the demo built from scratch)."""
    demo = str(REPO / "configs/demo.yaml")
    out = [f"output_dir={tmp_path}"]
    second = build_models(load_config(demo, [*out, "model.finetune.seed=1"])).oracle
    cfg = load_config(demo, [*out, f"eval.models=[target,oracle,oracle_seed1={second}]", "eval.suite=quick"])
    metrics = {label: r.metrics for label, r in evaluate(cfg).items()}
    assert metrics["target"]["forget_quality"] < 1e-3
    assert metrics["oracle_seed1"]["forget_quality"] > 0.05
