"""The attack stage on a pico run: a memorised target, its retain oracle and a gradient-ascent unlearned target
(2 gloo ranks), every attack applied to all three. Pins that each attack at zero strength reproduces the plain
evaluation exactly, that relearning brings back forgotten facts it never trained on (and not to the oracle),
and that the multiple-choice format tells a model that knows the facts from one that never saw them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import MEMORISE, pico_raw

ATTACKS = ["relearn", "quantize", "choice", "cloze", "paraphrase", "context", "prefix"]


def _raw(out, seed: int, **attack):
    return pico_raw(out, seed=seed, model={"finetune": MEMORISE},
                    method={"name": "ga", "alpha": 0.0},
                    # GA to destruction on purpose (retain probability 0.97 → 0.007): what relearning must revive.
                    train={"lr": 2e-3, "max_steps": 20, "num_processes": 2, "batch_size": 2,
                           "stop": {"collapse": None}},
                    eval={"suite": "quick", "models": ["target", "oracle", "unlearned"]},
                    attack={"attacks": ATTACKS, "relearn": {"steps": [0, 10, 30], "lr": 1e-3},
                            "quantize": {"schemes": ["none", "nf4"]}, **attack})


@pytest.fixture(scope="module", params=[0, pytest.param(1, marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    from unlearning.config import validate_config
    from unlearning.stages import attack, evaluate, prepare

    cfg = validate_config(_raw(tmp_path_factory.mktemp("attack") / "run", request.param))
    evals = evaluate(cfg)
    return cfg, evals, attack(cfg, evals, prepare(cfg))


def _zero(cfg, evals):
    """The same run with every prompt attack at zero strength (no context facts, no prefix)."""
    from unlearning.stages import attack, prepare

    none = cfg.attack.context.model_copy(update={"facts": 0, "prefix": ""})
    zero = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"attacks": ["context", "prefix"],
                                                                          "context": none})})
    return attack(zero, evals, prepare(zero))


FORGET_METRICS = ("forget_probability", "forget_truth_ratio", "forget_quality")


def test_quantization_none_reproduces_the_plain_evaluation_exactly(run):
    _, evals, attacked = run
    for label, plain in evals.items():
        point = attacked.results[label]["points"]["quantize:none"]["metrics"]
        for key in (*FORGET_METRICS, "world_facts_accuracy", "world_facts_truth_ratio"):
            assert point.get(key) == plain.metrics.get(key), (label, key)
        # Retain is scored on its answers alone after a weight attack: other batches, the same values up to the
        # float sums' order (measured: 1e-9 relative); no truth ratio.
        assert point["retain_probability"] == pytest.approx(plain.metrics["retain_probability"], rel=1e-6)
        assert "retain_truth_ratio" not in point


def test_prompt_attacks_at_zero_strength_reproduce_the_plain_evaluation_exactly(run):
    cfg, evals, _ = run
    zero = _zero(cfg, evals)  # the rows are encoded again from their text under the attack's template
    for label, plain in evals.items():
        for point in ("context", "prefix"):
            metrics = zero.results[label]["points"][point]["metrics"]
            for key in FORGET_METRICS:
                assert metrics.get(key) == plain.metrics.get(key), (label, point, key)


def test_relearning_zero_steps_scores_the_held_out_half_as_the_plain_evaluation_does(run):
    from unlearning.attack import relearn_data
    from unlearning.stages import prepare

    cfg, evals, attacked = run
    _, trained, held_out = relearn_data(cfg, prepare(cfg))
    assert trained and held_out and not set(trained) & set(held_out)
    for label, plain in evals.items():
        ours = attacked.results[label]["points"]["relearn@0"]["per_example"]["forget_truth_ratio"]
        theirs = np.asarray(plain.result["per_example"]["forget_truth_ratio"])[held_out]
        # A half is scored in batches of other shapes than the whole split, so the float sums may differ in the
        # last digits (measured: 5e-9 relative); the full-split attacks above are bit-identical.
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, err_msg=label)


def test_relearning_one_half_brings_back_the_other_half_for_the_unlearned_model_not_the_oracle(run):
    _, evals, attacked = run

    def gain(label: str) -> float:
        points = attacked.results[label]["points"]
        return points["relearn@30"]["metrics"]["forget_probability"] - points["relearn@0"]["metrics"][
            "forget_probability"]

    assert evals["unlearned"].metrics["forget_probability"] < 0.05  # GA removed the facts ...
    assert gain("unlearned") > gain("oracle") + 0.05  # ... and relearning the other people restores them
    trained = attacked.results["unlearned"]["points"]["relearn@30"]["metrics"]["forget_relearned_probability"]
    assert trained > 0.5  # the relearned half itself is learned again


def test_relearning_at_a_smaller_k_is_the_k_step_finetune_exactly(run):
    """One relearning run per model serves every k: its snapshot at k (constant lr) is a k-step fine-tune."""
    from unlearning.attack import relearn_config, relearn_data
    from unlearning.models import load_causal_lm
    from unlearning.stages import prepare
    from unlearning.unlearn import unlearn_many

    cfg, evals, attacked = run
    relearned = attacked.results["unlearned"]["relearned"]
    assert "/snapshots/step10" in relearned["10"] and relearned["30"].endswith("/model")
    alone = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={
        "relearn": cfg.attack.relearn.model_copy(update={"steps": [10]})})})
    data, _, _ = relearn_data(cfg, prepare(cfg))
    ten = unlearn_many({"ten": relearn_config(alone)}, prepared=data, target={"ten": evals["unlearned"].path},
                       summarise=False)["ten"]
    assert ten.summary["steps"] == 10 and not ten.summary["snapshots"]
    ours, theirs = load_causal_lm(relearned["10"]).state_dict(), load_causal_lm(ten.model).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["lm_head.weight"], load_causal_lm(relearned["30"]).state_dict()["lm_head.weight"])


def test_choice_formats_tell_the_target_from_the_oracle(run):
    _, _, attacked = run
    for point in ("choice", "cloze"):
        chance = attacked.results["target"]["points"][point]["metrics"]["chance_accuracy"]
        assert chance == pytest.approx(0.25)  # 3 perturbed answers + the true one
        assert attacked.results["target"]["points"][point]["metrics"]["forget_accuracy"] > 0.75
        assert attacked.results["oracle"]["points"][point]["metrics"]["forget_accuracy"] <= 0.5


def test_forget_quality_after_an_attack_is_against_the_oracle_after_the_same_attack(run):
    from unlearning.evaluate.metrics import ks_pvalue

    _, _, attacked = run
    for point in attacked.points:
        oracle = attacked.results["oracle"]["points"][point]["per_example"].get("forget_truth_ratio")
        model = attacked.results["unlearned"]["points"][point]
        if oracle is None:
            continue
        assert model["metrics"]["forget_quality"] == ks_pvalue(
            np.asarray(model["per_example"]["forget_truth_ratio"]), np.asarray(oracle)), point


def test_prompt_attacks_change_the_question_and_keep_the_plain_utility(run):
    _, evals, attacked = run
    points = attacked.results["target"]["points"]
    asked = {p: points[p]["asked"]["forget"][0] for p in ("choice", "cloze", "context")}
    assert "\nA. " in asked["choice"] and "___" in asked["cloze"] and asked["context"].count("?") >= 2
    for p in ("choice", "cloze", "paraphrase", "context", "prefix"):
        assert points[p]["metrics"]["retain_probability"] == evals["target"].metrics["retain_probability"]
    assert points["quantize:nf4"]["metrics"]["forget_probability"] != points["quantize:none"]["metrics"][
        "forget_probability"]  # 4-bit weights do change the model


def test_results_are_cached_by_content(run):
    from unlearning.stages import attack, prepare

    cfg, evals, attacked = run
    stamps = {label: p.stat().st_mtime_ns for label, p in attacked.paths.items()}
    again = attack(cfg, evals, prepare(cfg))
    assert {label: p.stat().st_mtime_ns for label, p in again.paths.items()} == stamps
    assert json.loads(attacked.paths["target"].read_text())["points"] == again.results["target"]["points"]


def test_bad_attack_configs_are_refused_before_any_model_is_built(tmp_path):
    from unlearning.config import validate_config
    from unlearning.data.prepare import prepare
    from unlearning.errors import UserError
    from unlearning.stages import preflight

    raw = _raw(tmp_path / "run", 0)
    raw["eval"]["models"] = ["target", "unlearned"]
    with pytest.raises(UserError, match=r"needs the oracle in eval\.models"):
        validate_config(raw)
    cfg = validate_config(_raw(tmp_path / "run", 0, relearn={"steps": [10], "batch_size": 8}))
    problems = preflight(cfg, prepare(cfg))
    assert any(p.startswith("attack.relearn") and "global batch" in p for p in problems), problems
    assert not (tmp_path / "run" / "models").exists()
