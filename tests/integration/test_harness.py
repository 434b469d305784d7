"""lm-evaluation-harness on our checkpoint gives our numbers: the embedded multiple-choice benchmark's prepared
splits as local harness tasks, scored by the harness and by our `multiple_choice` metric on the same model."""

from __future__ import annotations

import pytest

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.data.encoders import QAEncoder
from unlearning.evaluate.knowledge import option_loglikelihoods
from unlearning.evaluate.probes import probe_split
from unlearning.evaluate.runner import evaluate_model
from unlearning.models import build_models, load_causal_lm
from unlearning.stages import prepare

pytest.importorskip("lm_eval")


def test_the_harness_and_our_metric_agree_on_every_options_loglikelihood_and_the_accuracies(tmp_path):
    raw = pico_raw(tmp_path / "run", data={"synthetic": {"num_entities": 12, "facts_per_entity": 4, "num_utility": 6,
                                                         "format": "choice"}},
                   model={"finetune": MEMORISE},
                   eval={"suite": "wmdp", "models": ["target"], "lm_eval": {"tasks": ["split:forget_choice",
                                                                                      "split:retain_choice"]}})
    cfg = validate_config(raw)
    prepared = prepare(cfg)
    target = build_models(cfg, prepared).target
    result = evaluate_model(target, prepared, cfg, label="target").result
    metrics = result["metrics"]
    for split in ("forget_choice", "retain_choice"):
        for name in ("acc", "acc_norm"):
            assert metrics[f"lm_eval_{split}_{name}"] == pytest.approx(metrics[f"{split}_{name}"], abs=1e-12)
    assert metrics["forget_choice_acc"] > 0.25  # the target learned the passages: above chance
    model, tok = load_causal_lm(target), prepared.tokenizer()
    rows = list(prepared.splits()["forget_choice"])
    ours = option_loglikelihoods(probe_split(model, rows, QAEncoder(tok, cfg.data.template, cfg.data.max_length),
                                             batch_size=8, max_new_tokens=8))
    theirs = result["lm_eval"]["loglikelihoods"]["split:forget_choice"]
    assert len(theirs) == len(rows) == len(ours)
    for a, b in zip(ours, theirs, strict=True):
        assert a.tolist() == pytest.approx(b, rel=1e-4, abs=1e-4)
