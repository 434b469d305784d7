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


def scores(logp: list[float], ntok: list[int], ok: list[list[bool]] | None = None, eos: bool = False) -> Scores:
    toks = [np.full(n, lp / n) for lp, n in zip(logp, ntok, strict=True)]
    oks = [np.array(o) for o in ok] if ok else [np.ones(n, bool) for n in ntok]
    return Scores(np.array(logp, float), np.array(ntok), toks, [t * 0 for t in toks], [t * 0 + 1 for t in toks], oks,
                  np.full(len(logp), eos))


def token_scores(token_logp: list[list[float]], mu: list[list[float]] | None = None,
                 sigma: list[list[float]] | None = None, eos: bool = True) -> Scores:
    """Scores with given per-token log-probs; the last token of each is the EOS unless `eos=False`."""
    t = [np.array(x, float) for x in token_logp]
    m = [np.array(x, float) for x in mu] if mu else [x * 0 for x in t]
    sd = [np.array(x, float) for x in sigma] if sigma else [x * 0 + 1 for x in t]
    return Scores(np.array([x.sum() for x in t]), np.array([len(x) for x in t]), t, m, sd,
                  [np.ones(len(x), bool) for x in t], np.full(len(t), eos))


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


def test_choice_accuracy_sums_the_answer_tokens_without_the_eos():
    """Item 1: answer tokens −1, −1 then EOS −9 (sum without EOS −2) vs a wrong answer −0.5, −3 then EOS −0.1
    (−3.5): right, although the EOS makes the answer's mean log-p the lower one (−11/3 vs −3.6/3). Item 2: the
    wrong answer's −1.5 beats the answer's −2 (a single token, its EOS −0.1 left out): wrong. Item 3: a tie: wrong."""
    answer = token_scores([[-1.0, -1.0, -9.0], [-2.0, -0.1], [-1.0, -0.2]])
    wrong = token_scores([[-0.5, -3.0, -0.1], [-1.5, -5.0], [-1.0, -3.0]])
    assert m.choice_accuracy(answer, [wrong]).tolist() == [1.0, 0.0, 0.0]
    assert m.choice_probability(answer, [wrong])[0] < 0.5  # the TOFU choice probability prefers the wrong one
    other = token_scores([[-0.5, -0.5, -9.0], [-9.0, -1.0], [-9.0, -1.0]])  # −1 beats item 1's −2: every option counts
    assert m.choice_accuracy(answer, [wrong, other]).tolist() == [0.0, 0.0, 0.0]
    assert m.choice_accuracy(answer, [token_scores([[-1.0, -1.0, 0.0]] * 3)]).tolist() == [0.0, 0.0, 1.0]  # −2 ties


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
    """4 answer tokens, following open-unlearning memorization.py L235-254 (ES) and L190-204 (EM). All right:
    k = 0, ES 1. Only the first wrong: k = 1, ES 3/4. Second wrong: k = 2, ES 1/2. The last wrong: no suffix
    matches, and the reference's loop leaves k = n − 1 = 3, so ES = 1/4 (not 0). EM is the fraction right:
    1, 3/4, 3/4, 3/4; an empty answer has ES 0 and no EM (skipped by the mean)."""
    ok = [np.array(x).astype(bool) for x in ([1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [])]
    assert m.extraction_strength(ok) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    em = m.exact_memorization(ok)
    assert em[:4] == pytest.approx([1.0, 0.75, 0.75, 0.75]) and np.isnan(em[4])
    value = m._mean(em)
    assert value.value == pytest.approx(3.25 / 4) and value.per_example[4] is None


def test_memorization_metrics_drop_the_eos_position():
    """open-unlearning's `tokenwise_vocab_logprobs` (utils.py L172-175) drops the last labelled token, the EOS.
    Answer tokens right, right, wrong, then the EOS right: ES over the 3 answer tokens is 1/3 (the last one is
    wrong, see above) and EM 2/3; counting the EOS would give ES 1 − 3/4 = 1/4 and EM 3/4."""
    s = token_scores([[-0.1, -0.1, -2.0, -0.1]])
    s = Scores(s.logp, s.ntokens, s.token_logp, s.token_mu, s.token_sigma, [np.array([True, True, False, True])],
               s.last_eos)
    probes = SplitProbes(answer=s, answers=["a"], generation=[])
    got = m.memorization(m.EvalInputs({"forget": probes}))
    assert got["forget_extraction_strength"].value == pytest.approx(1 / 3)
    assert got["forget_exact_memorization"].value == pytest.approx(2 / 3)


def test_min_k_takes_the_floor_of_k_n_lowest_tokens():
    """open-unlearning mia/min_k.py L24: num_k = max(1, int(n·k)). k = 40 % of 5 tokens → 2 lowest, −5 and −4:
    mean −4.5. Of 4 tokens → int(1.6) = 1 (a ceil would take 2): −4. Of 2 → int(0.8) = 0 → at least 1. Empty → 0."""
    got = m.min_k([np.array([-1.0, -5, -2, -4, -3]), np.array([-1.0, -4, -2, -3]), np.array([-1.0, -2]),
                   np.array([])], 0.4)
    assert got == pytest.approx([-4.5, -4.0, -2.0, 0.0])


def test_min_k_pp_z_scores_drop_the_eos_and_clamp_the_variance():
    """z = (log p − μ)/σ (open-unlearning mia/min_k_plus_plus.py L26-35): (−1 − (−2)) / 0.5 = 2. A σ of 1e-5
    (variance 1e-10) is clamped to variance 1e-6, σ = 1e-3: (−1 − (−1.5)) / 1e-3 = 500. The EOS is dropped."""
    s = token_scores([[-1.0, -1.0, -0.3]], mu=[[-2.0, -1.5, 0.0]], sigma=[[0.5, 1e-5, 9.0]])
    z = m.min_k_pp_z(s)
    assert len(z[0]) == 2 and z[0] == pytest.approx([2.0, 500.0])


def test_mia_scores_min_k_without_the_eos_and_zlib_on_the_decoded_label_text():
    """Min-K% of [−1, −3, EOS −9] over the 2 answer tokens, k = 40 %: int(0.8) → 1 lowest, −3 (with the EOS it
    would be −9). ZLib: mean NLL incl. EOS ((1 + 3 + 9)/3) over the compressed length of ' Drulzeath.', the text
    the labels decode to, with its leading space (open-unlearning mia/zlib.py L25-29)."""
    s = token_scores([[-1.0, -3.0, -9.0]])
    probes = SplitProbes(answer=s, answers=["Drulzeath."], generation=[], label_texts=[" Drulzeath."])
    got = m._mia_scores(probes)
    assert got["min_k"] == pytest.approx([-3.0])
    assert got["loss"] == pytest.approx([-13 / 3])
    assert got["zlib"] == pytest.approx([-(13 / 3) / len(zlib.compress(b" Drulzeath."))])
    assert len(zlib.compress(b" Drulzeath.")) != len(zlib.compress(b"Drulzeath."))  # the space matters


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


def test_privleak_follows_muse_and_open_unlearning():
    """open-unlearning privacy.py L40-52 (MUSE's convention): AUCs are taken as 1 − A (the forget set is their
    non-member class) and PrivLeak = (score − ref) / (ref + 1e-10) × 100. A model whose every member scores
    higher (A = 1) against an oracle at A_o = 0.5: (0 − 0.5) / 0.5 × 100 = −100 (the forget set still looks like
    training data). A_o = 0.6, A = 0.3: (0.7 − 0.4) / 0.4 × 100 = +75 (over-unlearned)."""
    forget = SplitProbes(answer=scores([-1.0, -1.0], [1, 1]), answers=["a", "b"], generation=[])
    holdout = SplitProbes(answer=scores([-5.0, -6.0], [1, 1]), answers=["c", "d"], generation=[])
    x = m.EvalInputs({"forget": forget, "holdout": holdout}, oracle={"metrics": {"mia_min_k_auc": 0.5}})
    assert m.mia(x)["mia_min_k_auc"].value == pytest.approx(1.0)  # every member scores higher
    assert m.privleak(x)["privleak"].value == pytest.approx(-100.0)
    assert m.privleak_value(0.3, 0.6) == pytest.approx(75.0)
    assert m.privleak_value(0.6, 0.6) == pytest.approx(0.0)
    assert m.privleak(m.EvalInputs(x.probes))["privleak"].value is None


def test_truth_ratio_of_a_split_without_paraphrases_is_taken_against_the_answer():
    """TOFU's real_authors / world_facts have no paraphrased answer; its eval config scores them against the
    answer itself (config/eval_everything.yaml, base_answer_key: answer). Answer log p −1 per token, perturbed −2:
    TR = e^-1, retain aggregation 1 − e^-1; and they count in model utility: 3 terms per such split."""
    ra = SplitProbes(answer=scores([-1.0], [1]), answers=["Jane Austen"], generation=["Jane Austen"],
                     perturbed=[scores([-2.0], [1])])
    x = m.EvalInputs({"retain": probes_with_tr([-1.0]), "real_authors": ra})
    tr = m.truth_ratio_metric(x)["real_authors_truth_ratio"]
    assert tr.value == pytest.approx(1 - math.exp(-1)) and tr.per_example == pytest.approx([math.exp(-1)])
    assert set(m.model_utility(x)["model_utility"].per_example) == {
        f"{s}_{t}" for s in ("retain", "real_authors") for t in ("probability", "rouge", "truth_ratio")}


def test_suites_name_registered_metrics_and_unknown_suites_fail():
    for name in SUITES:
        assert get_suite(name).metrics
    with pytest.raises(UserError, match="valid: tofu"):
        get_suite("tofo")


def test_the_eval_cache_key_changes_with_the_suites_metrics_and_the_metric_code(monkeypatch, tmp_path):
    """A cached eval.json is trusted only for the same metric list and the same code that defines the metrics:
    the key hashes both (not just the suite's name)."""
    from types import SimpleNamespace

    from unlearning.config import validate_config
    from unlearning.evaluate import runner
    from unlearning.evaluate.suites import Suite

    cfg = validate_config({"name": "x"})
    prepared = SimpleNamespace(fingerprint="f")
    key = runner.eval_key(tmp_path, prepared, cfg, None)
    assert runner.eval_key(tmp_path, prepared, cfg, None) == key
    tofu = SUITES["tofu"]
    monkeypatch.setitem(SUITES, "tofu", Suite("tofu", tofu.metrics[:-1], tofu.generations))
    assert runner.eval_key(tmp_path, prepared, cfg, None) != key
    monkeypatch.setitem(SUITES, "tofu", tofu)
    monkeypatch.setattr(runner, "definitions_hash", lambda: "another definition")
    assert runner.eval_key(tmp_path, prepared, cfg, None) != key
