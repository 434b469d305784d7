"""Each metric pinned on hand-made inputs, with the arithmetic in the docstrings."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from unlearning.errors import UserError
from unlearning.evaluate import metrics as m
from unlearning.evaluate.probes import Scores, SplitProbes
from unlearning.evaluate.suites import SUITES, get_suite


def scores(logp: list[float], ntok: list[int], ok: list[list[bool]] | None = None) -> Scores:
    toks = [np.full(n, lp / n) for lp, n in zip(logp, ntok, strict=True)]
    oks = [np.array(o) for o in ok] if ok else [np.ones(n, bool) for n in ntok]
    return Scores(np.array(logp, float), np.array(ntok), toks, [t * 0 for t in toks], [t * 0 + 1 for t in toks], oks)


def test_truth_ratio_and_its_two_aggregations():
    """Paraphrased answer: logπ −2 over 2 tokens → log p = −1. Perturbed: −4/2 = −2 and −6/2 = −3, whose
    geometric mean of p is exp(−2.5). TR = exp(−2.5 − (−1)) = exp(−1.5) = 0.223130.
    Forget: min(TR, 1/TR) = 0.223130; retain: max(0, 1 − TR) = 0.776870."""
    tr = m.truth_ratio(scores([-2.0], [2]), [scores([-4.0], [2]), scores([-6.0], [2])])
    assert tr == pytest.approx([0.2231302], abs=1e-7)
    assert m.truth_ratio_forget(tr) == pytest.approx([0.2231302], abs=1e-7)
    assert m.truth_ratio_retain(tr) == pytest.approx([0.7768698], abs=1e-7)
    assert m.truth_ratio_forget(np.array([4.0])) == pytest.approx([0.25])  # 1/TR when TR > 1
    assert m.truth_ratio_retain(np.array([4.0])) == pytest.approx([0.0])  # clipped at 0


def test_choice_probability():
    """p_true = e^-1, p_wrong = e^-2 and e^-3: e^-1 / (e^-1 + e^-2 + e^-3) = 1 / (1 + e^-1 + e^-2) = 0.665241."""
    got = m.choice_probability(scores([-2.0], [2]), [scores([-4.0], [2]), scores([-3.0], [1])])
    assert got == pytest.approx([0.665241], abs=1e-6)


def test_ks_pvalue_exact():
    """Samples {1,2,3} vs {4,5,6} are fully separated (D = 1); the exact two-sided p-value is the chance
    that one of the two extreme orderings comes up among C(6,3) = 20 equally likely ones: 2/20 = 0.1."""
    assert m.ks_pvalue(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])) == pytest.approx(0.1)
    assert m.ks_pvalue(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == pytest.approx(1.0)


def test_harmonic_mean():
    """3 / (1/1 + 1/0.5 + 1/0.25) = 3/7; any zero makes it 0."""
    assert m.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert m.harmonic_mean([1.0, 0.0]) == 0.0


def test_auc():
    """Members {.9, .8, .3} vs non-members {.5, .1}: 5 of the 6 pairs rank the member higher → 5/6; a tie
    counts one half."""
    assert m.auc(np.array([0.9, 0.8, 0.3]), np.array([0.5, 0.1])) == pytest.approx(5 / 6)
    assert m.auc(np.array([1.0]), np.array([1.0])) == pytest.approx(0.5)
    assert m.auc(np.array([0.1, 0.2]), np.array([0.5, 0.6])) == pytest.approx(0.0)


def test_extraction_strength_and_exact_memorization():
    """4 answer tokens. All right: k* = 0, ES 1. Only the first wrong: k* = 1, ES 3/4. The last wrong:
    k* = 4, ES 0. Second wrong: k* = 2, ES 1/2. EM is the fraction right: 1, 3/4, 3/4, 3/4."""
    ok = [np.array(x) for x in ([1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1])]
    ok = [o.astype(bool) for o in ok]
    assert m.extraction_strength(ok) == pytest.approx([1.0, 0.75, 0.0, 0.5])
    assert m.exact_memorization(ok) == pytest.approx([1.0, 0.75, 0.75, 0.75])


def test_min_k_and_min_k_pp():
    """k = 40 % of 5 tokens → the ceil(2) lowest, −5 and −4: mean −4.5. Min-K%++ z = (log p − μ)/σ:
    (−1 − (−2)) / 0.5 = 2."""
    assert m.min_k([np.array([-1.0, -5, -2, -4, -3])], 0.4) == pytest.approx([-4.5])
    s = Scores(np.array([-1.0]), np.array([1]), [np.array([-1.0])], [np.array([-2.0])], [np.array([0.5])],
               [np.array([True])])
    assert m.min_k_pp_z(s)[0] == pytest.approx([2.0])


def test_zlib_score():
    """Mean NLL 2 (logπ −6 over 3 tokens) divided by the zlib-compressed length of the text."""
    n = len(zlib.compress(b"Drulzeath."))
    assert m.zlib_score(scores([-6.0], [3]), ["Drulzeath."]) == pytest.approx([2.0 / n])


def test_rouge_l_recall_and_f1():
    """LCS of 'the cat sat' in 'the cat sat on the mat' is 3 words: recall 3/6, precision 3/3, F1 2/3.
    Stemming matches 'cats' with 'cat'."""
    assert m.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx([0.5])
    assert m.rouge_l(["the cat sat"], ["the cat sat on the mat"], kind="fmeasure") == pytest.approx([2 / 3])
    assert m.rouge_l(["cats"], ["cat"]) == pytest.approx([1.0])


def probes_with_tr(logp_para: list[float]) -> SplitProbes:
    """N items with one perturbed answer at log p −2 (1 token) and the paraphrase at `logp_para`."""
    n = len(logp_para)
    return SplitProbes(answer=scores([-1.0] * n, [1] * n), answers=["a"] * n, generation=["a"] * n,
                       paraphrased=scores(logp_para, [1] * n), perturbed=[scores([-2.0] * n, [1] * n)])


def test_forget_quality_needs_an_oracle_and_is_the_ks_pvalue():
    forget = probes_with_tr([-1.0, -2.0, -3.0])  # TR = e^-1, e^0, e^1
    alone = m.forget_quality(m.EvalInputs({"forget": forget}))["forget_quality"]
    assert alone.value is None and "oracle" in alone.reason
    oracle = {"per_example": {"forget_truth_ratio": [math.exp(4), math.exp(5), math.exp(6)]}, "metrics": {}}
    fq = m.forget_quality(m.EvalInputs({"forget": forget}, oracle=oracle))["forget_quality"]
    assert fq.value == pytest.approx(0.1)  # fully separated samples of 3 and 3 (see test_ks_pvalue_exact)
    assert m.forget_quality(m.EvalInputs({"forget": forget}, is_oracle=True))["forget_quality"].value is None


def test_model_utility_is_the_harmonic_mean_of_its_terms():
    """Retain: p = e^-1 = 0.3679, ROUGE 1 (generation equals answer), TR = e^(−2 − (−1)) → 1 − e^-1 = 0.6321.
    No utility sets: HM of the three = 3 / (1/0.3679 + 1 + 1/0.6321) = 0.565..."""
    retain = probes_with_tr([-1.0])
    got = m.model_utility(m.EvalInputs({"retain": retain}))["model_utility"]
    p, tr = math.exp(-1), 1 - math.exp(-1)
    assert got.value == pytest.approx(3 / (1 / p + 1 + 1 / tr))
    assert set(got.per_example) == {"retain_probability", "retain_rouge", "retain_truth_ratio"}


def test_privleak():
    """Model AUC a and oracle AUC 0.5: (a − 0.5) / 0.5 × 100."""
    forget = SplitProbes(answer=scores([-1.0, -1.0], [1, 1]), answers=["a", "b"], generation=[])
    holdout = SplitProbes(answer=scores([-5.0, -6.0], [1, 1]), answers=["c", "d"], generation=[])
    x = m.EvalInputs({"forget": forget, "holdout": holdout}, oracle={"metrics": {"mia_min_k_auc": 0.5}})
    assert m.mia(x)["mia_min_k_auc"].value == pytest.approx(1.0)  # every member scores higher
    assert m.privleak(x)["privleak"].value == pytest.approx(100.0)
    assert m.privleak(m.EvalInputs(x.probes))["privleak"].value is None


def test_suites_name_registered_metrics_and_unknown_suites_fail():
    for name in SUITES:
        assert get_suite(name).metrics
    with pytest.raises(UserError, match="valid: tofu"):
        get_suite("tofo")
