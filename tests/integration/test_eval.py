"""The evaluation runner on pico models: batched probes = per-example probes; the stage's eval.json and cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import MEMORISE
from unlearning.data.prepare import prepare
from unlearning.errors import UserError
from unlearning.evaluate.naive import probe_split_naive
from unlearning.evaluate.probes import Scores, probe_split
from unlearning.evaluate.runner import evaluate
from unlearning.models import tiny_llama


def assert_scores_equal(a: Scores, b: Scores, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.logp, b.logp, atol=tol, rtol=0)
    np.testing.assert_array_equal(a.ntokens, b.ntokens)
    for name in ("token_logp", "token_mu", "token_sigma"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            np.testing.assert_allclose(x, y, atol=tol, rtol=0, err_msg=name)
    for x, y in zip(a.argmax_ok, b.argmax_ok, strict=True):
        np.testing.assert_array_equal(x, y)


def test_batched_probes_equal_per_example_probes(pico):
    """fp32 batches of mixed lengths (right-padded for scoring, left-padded for generation) give the
    per-example values within 1e-5, and the same greedy text. The per-example side is an independent,
    unbatched implementation (unlearning/evaluate/naive.py)."""
    cfg = pico()
    prepared = prepare(cfg)
    tok = prepared.tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(cfg, tok).eval()
    rows = list(prepared.splits()["forget"])
    assert len({len(r["input_ids"]) for r in rows}) > 1  # lengths differ, so batches pad
    batched = probe_split(model, rows, tok, cfg.data.template, max_length=cfg.data.max_length, batch_size=5,
                          max_new_tokens=6)
    naive = probe_split_naive(model, rows, tok, cfg.data.template, max_length=cfg.data.max_length, max_new_tokens=6)
    for name in ("answer", "paraphrased", "para_question"):
        assert_scores_equal(getattr(batched, name), getattr(naive, name))
    assert batched.perturbed is not None and naive.perturbed is not None
    assert len(batched.perturbed) == len(naive.perturbed) == 3
    for a, b in zip(batched.perturbed, naive.perturbed, strict=True):
        assert_scores_equal(a, b)
    assert batched.generation == naive.generation
    assert batched.para_generation == naive.para_generation
    assert any(batched.generation)  # the model generated something to compare


@pytest.fixture
def built(pico):
    return pico(model={"finetune": MEMORISE}, eval={"models": ["target", "oracle"], "batch_size": 8})


def test_eval_stage_writes_eval_json_with_per_example_values_and_caches(built, pico):
    results = evaluate(built)
    assert list(results) == ["target", "oracle"]
    target, oracle = results["target"].result, results["oracle"].result
    counts = target["counts"]
    assert set(counts) == {"forget", "retain", "holdout", "world_facts"}
    # Every aggregate has its per-example values, one per item of its split.
    assert len(target["per_example"]["forget_probability"]) == counts["forget"]
    assert len(target["per_example"]["forget_truth_ratio"]) == counts["forget"]
    assert set(target["per_example"]["mia_loss_auc"]) == {"members", "nonmembers"}
    assert len(target["generations"]["forget"]["generation"]) == counts["forget"]
    per_item = target["per_example"]["forget_probability"]
    assert np.mean(per_item) == pytest.approx(target["metrics"]["forget_probability"])
    # The target memorised the forget facts; the oracle never saw them.
    m_t, m_o = target["metrics"], oracle["metrics"]
    assert m_t["forget_probability"] > m_o["forget_probability"] + 0.3
    assert m_t["mia_loss_auc"] > 0.9 and m_t["forget_extraction_strength"] > m_o["forget_extraction_strength"]
    assert 0 <= m_t["forget_quality"] < 0.05
    assert 0 < m_t["model_utility"] <= 1 and m_t["privleak"] > 0
    assert m_o["forget_quality"] is None and "oracle itself" in oracle["unavailable"]["forget_quality"]
    assert target["oracle"] == str(results["oracle"].path)
    # Rerunning reuses both files untouched.
    stamps = {k: (r.eval_dir / "eval.json").stat().st_mtime_ns for k, r in results.items()}
    again = evaluate(built)
    assert all(r.cached for r in again.values())
    assert {k: (r.eval_dir / "eval.json").stat().st_mtime_ns for k, r in again.items()} == stamps


def test_without_an_oracle_forget_quality_is_unavailable_with_the_reason(built):
    cfg = built.model_copy(update={"eval": built.eval.model_copy(update={"models": ["target"], "suite": "quick"})})
    result = evaluate(cfg)["target"].result
    assert result["metrics"]["forget_quality"] is None and result["metrics"]["privleak"] is None
    assert "add oracle to eval.models" in result["unavailable"]["forget_quality"]
    assert "forget_rouge" not in result["metrics"]  # the quick suite does not generate
    json.dumps(result, allow_nan=False)  # eval.json holds no NaN or inf


def test_bad_checkpoint_paths_fail_before_any_model_is_loaded(pico, tmp_path):
    cfg = pico(eval={"models": ["target", f"mine={tmp_path / 'nowhere'}"]})
    with pytest.raises(UserError, match=r"mine=.*no checkpoint there"):
        evaluate(cfg)
    assert not (cfg.out / "models").exists()  # nothing was built
    with pytest.raises(UserError, match="neither a role"):
        pico(eval={"models": ["targt"]})
    with pytest.raises(UserError, match=r"eval\.suite: unknown suite"):
        pico(eval={"suite": "tofo"})
