"""The evaluation runner on pico models: batched probes = per-example probes; the stage's eval.json and cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import MEMORISE
from unlearning.data.encoders import QAEncoder
from unlearning.data.prepare import prepare
from unlearning.errors import UserError
from unlearning.evaluate.metrics import harmonic_mean
from unlearning.evaluate.naive import probe_split_naive
from unlearning.evaluate.probes import Scores, probe_split
from unlearning.models import load_causal_lm, tiny_llama
from unlearning.stages import evaluate


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
    batched = probe_split(model, rows, QAEncoder(tok, cfg.data.template, cfg.data.max_length), batch_size=5,
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
    assert 0 < m_t["model_utility"] <= 1 and m_t["privleak"] < -50  # MUSE sign: still recognised
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


def _reference_scores(model, rows, tokenizer) -> dict[str, list[float]]:
    """open-unlearning's per-item arithmetic, written out here one unpadded row at a time on the full logits
    (src/evals/metrics/utils.py `evaluate_probability` and `tokenwise_*logprobs`, memorization.py, mia/*.py at
    commit d3d7cf9): the answer positions are the labelled ones minus the last (the EOS); scores are oriented
    as theirs (higher = non-member)."""
    import zlib

    out: dict[str, list[float]] = {k: [] for k in ("es", "em", "loss", "zlib", "min_k", "min_k_pp")}
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor(r["labels"])
            logits = model(input_ids=ids).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
            avg_loss = float(nll) / int((labels != -100).sum())
            vocab = torch.log_softmax(logits, -1)[:-1]
            idx = (labels != -100).nonzero()[:, 0][:-1]
            dist, labs = vocab[idx[0] - 1: idx[-1]], labels[idx]
            target = dist.gather(-1, labs[:, None])[:, 0]
            preds = dist.argmax(-1)
            n = len(labs)
            for k in range(n):
                if torch.equal(preds[k:], labs[k:]):
                    break
            out["es"].append(1 - k / n)
            out["em"].append(float((preds == labs).sum()) / n)
            num_k = max(1, int(n * 0.4))
            out["min_k"].append(-float(np.sort(target.numpy())[:num_k].mean()))
            mu = (dist.exp() * dist).sum(-1)
            var = ((dist.exp() * dist.square()).sum(-1) - mu.square()).clamp(min=1e-6)
            z = ((target - mu) / var.sqrt()).numpy()
            out["min_k_pp"].append(-float(np.sort(z)[:num_k].mean()))
            out["loss"].append(avg_loss)
            text = tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True)
            out["zlib"].append(avg_loss / len(zlib.compress(text.encode("utf-8"))))
    return out


def _reference_auc(forget: list[float], holdout: list[float]) -> float:
    """roc_auc_score with the forget set labelled 0 and the holdout 1 (mia/utils.py L60-69), by pair counting."""
    pairs = [(h > f) + 0.5 * (h == f) for f in forget for h in holdout]
    return float(np.mean(pairs))


def test_memorisation_and_membership_metrics_equal_open_unlearnings_arithmetic(built):
    """On the pico target and oracle, every memorisation and MIA value of eval.json equals open-unlearning's
    arithmetic on the same model and tokens (unbatched, full logits), per item to 1e-4; PrivLeak follows from
    the two AUCs as in its privacy.py."""
    results = evaluate(built)
    prepared = prepare(built)
    tok, splits = prepared.tokenizer(), prepared.splits()
    aucs = {}
    for label in ("target", "oracle"):
        model = load_causal_lm(results[label].path).eval()
        ours = results[label].result
        ref = {s: _reference_scores(model, list(splits[s]), tok) for s in ("forget", "holdout")}
        np.testing.assert_allclose(ours["per_example"]["forget_extraction_strength"], ref["forget"]["es"], atol=1e-9)
        np.testing.assert_allclose(ours["per_example"]["forget_exact_memorization"], ref["forget"]["em"], atol=1e-9)
        for attack in ("loss", "zlib", "min_k", "min_k_pp"):
            per = ours["per_example"][f"mia_{attack}_auc"]
            np.testing.assert_allclose(per["members"], -np.array(ref["forget"][attack]), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(per["nonmembers"], -np.array(ref["holdout"][attack]), rtol=1e-4, atol=1e-6)
            expected = _reference_auc(ref["forget"][attack], ref["holdout"][attack])
            assert ours["metrics"][f"mia_{attack}_auc"] == pytest.approx(expected, abs=1e-9), attack
        aucs[label] = ours["metrics"]["mia_min_k_auc"]
    score, ref_auc = 1 - aucs["target"], 1 - aucs["oracle"]
    assert results["target"].metrics["privleak"] == pytest.approx((score - ref_auc) / (ref_auc + 1e-10) * 100)
    assert results["target"].metrics["privleak"] < 0  # the target still recognises its forget set


def test_tofus_real_sets_evaluate_beside_the_synthetic_ones_with_nine_utility_terms(pico):
    """TOFU's packaged real_authors and world_facts sets as extra evaluation splits: model utility has TOFU's 9
    terms (probability, ROUGE and truth ratio on retain and on each set), the sets' probability is the choice
    probability over the 4 options and their truth ratio is taken against the answer."""
    cfg = pico(data={"max_length": 160, "splits": {"real_authors": "builtin:tofu/real_authors",
                                                     "real_world": "builtin:tofu/world_facts"}},
               eval={"models": ["target"], "utility_splits": ["real_authors", "real_world"], "max_new_tokens": 4,
                     "max_items": {"real_authors": 20, "real_world": 20}})
    result = evaluate(cfg)["target"].result
    terms = result["per_example"]["model_utility"]
    assert set(terms) == {f"{s}_{m}" for s in ("retain", "real_authors", "real_world")
                          for m in ("probability", "rouge", "truth_ratio")}
    assert result["counts"]["real_authors"] == 20
    # A model trained from scratch knows no real author (ROUGE 0 there), so its utility is 0: TOFU's harmonic mean.
    assert result["metrics"]["model_utility"] == pytest.approx(harmonic_mean(list(terms.values())))
    assert 0 < result["metrics"]["real_authors_probability"] < 1  # p_true / (p_true + Σ p_wrong) of each item
    assert len(result["per_example"]["real_world_truth_ratio"]) == 20
