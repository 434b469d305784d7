"""Evaluation metrics: pure functions over probe outputs, registered by name in `METRICS`.

Definitions follow the field's reference code, cited per function: TOFU's original code
(github.com/locuslab/tofu, `aggregate_eval_stat.py`, commit bdc209e) for probability, ROUGE, truth
ratio, forget quality and model utility; open-unlearning (github.com/locuslab/open-unlearning,
`src/evals/metrics/`, commit d3d7cf9) for extraction strength, exact memorization, the membership
attacks and PrivLeak, which it computes as MUSE does. The first half of this module holds the
arithmetic on plain arrays (pinned by unit tests on hand-made inputs); the second half registers the
metrics a suite names. A registered metric takes an `EvalInputs` and returns `{flat_name: Value}`; a
value it cannot compute (no oracle, no holdout split) is a `Value` with `value=None` and the reason,
never a number.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unlearning.evaluate.probes import Scores, SplitProbes
from unlearning.registry import Registry

METRICS = Registry("metric")


# --- arithmetic on arrays -------------------------------------------------------------------------


def truth_ratio(paraphrased: Scores, perturbed: Sequence[Scores]) -> np.ndarray:
    """Per item TR = (geometric mean over the P perturbed answers of p) / p(paraphrased answer), with
    p the length-normalised probability; computed in log space: exp(mean_j log p_j − log p_para) (TOFU
    aggregate_eval_stat.py L61-66 computes its inverse, exp(loss_pert − loss_para) with the per-answer mean loss
    averaged over the perturbed answers, which both aggregations below treat the same). (N,)"""
    return truth_ratio_of(paraphrased.logp, paraphrased.ntokens, [(s.logp, s.ntokens) for s in perturbed])


def truth_ratio_of(logp: np.ndarray, ntokens: np.ndarray, perturbed: Sequence[tuple[np.ndarray, np.ndarray]]
                   ) -> np.ndarray:
    """`truth_ratio` from summed log-probs and token counts: the base answers' (N,), and per perturbed answer
    its (logp, ntokens) pair of (N,) arrays."""
    log_para = logp / np.maximum(ntokens, 1)
    log_pert = np.stack([lp / np.maximum(n, 1) for lp, n in perturbed], axis=1)  # (N, P)
    return np.exp(log_pert.mean(axis=1) - log_para)


def truth_ratio_forget(tr: np.ndarray) -> np.ndarray:
    """Forget aggregation per item: min(TR, 1/TR) (1 = cannot tell true from false)."""
    return np.minimum(tr, 1.0 / tr)


def truth_ratio_retain(tr: np.ndarray) -> np.ndarray:
    """Retain/utility aggregation per item: max(0, 1 − TR) (1 = prefers the true answer strongly)."""
    return np.maximum(0.0, 1.0 - tr)


def choice_probability(answer: Scores, perturbed: Sequence[Scores]) -> np.ndarray:
    """Per item p_correct / (p_correct + Σ_j p_wrong_j), length-normalised p (TOFU's utility sets;
    aggregate_eval_stat.py L49-53). (N,)"""
    p_true = answer.probability()
    p_wrong = np.stack([s.probability() for s in perturbed], axis=1).sum(axis=1)
    return p_true / (p_true + p_wrong)


def choice_accuracy(answer: Scores, perturbed: Sequence[Scores]) -> np.ndarray:
    """Per item 1.0 where the answer's summed log-likelihood over its own tokens, without the EOS, is above every
    perturbed answer's, else 0.0: lm-evaluation-harness's multiple-choice `acc` with the perturbed answers as the
    wrong options (a tie counts as wrong). Unlike the choice probability it neither averages over tokens nor
    scores the end of the turn, which a chat model rarely puts right after a bare name. (N,)"""
    wrong = np.stack([own_loglikelihood(s) for s in perturbed], axis=1).max(axis=1)
    return (own_loglikelihood(answer) > wrong).astype(np.float64)


def own_loglikelihood(s: Scores) -> np.ndarray:
    """(N,) each answer's summed log-likelihood over its own tokens, without the EOS the encoder appends: what
    lm-evaluation-harness's `loglikelihood` request scores for an option."""
    return np.array([t.sum() for t in s.without_eos("token_logp")])


def ks_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided two-sample Kolmogorov–Smirnov p-value (scipy's `ks_2samp`, as TOFU aggregate_eval_stat.py L25;
    exact where it can be)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/v (scipy); 0 when any value is 0 (one useless capability makes the model useless)."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    return 0.0 if (v <= 0).any() else float(hmean(v))


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of a membership score (higher = member): P(score_m > score_n) + ½·P(tie), via Mann–Whitney U."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(members, nonmembers, alternative="two-sided").statistic
    return float(u / (len(members) * len(nonmembers)))


def rouge_l(predictions: Sequence[str], references: Sequence[str], kind: str = "recall") -> np.ndarray:
    """Per item ROUGE-L (stemmed, `rouge-score`) of a prediction against its reference; kind is
    "recall" (TOFU) or "fmeasure" (MUSE). (N,)"""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([getattr(scorer.score(ref, pred)["rougeL"], kind) for pred, ref in zip(
        predictions, references, strict=True)], dtype=np.float64)


def extraction_strength(argmax_ok: Sequence[np.ndarray]) -> np.ndarray:
    """Per item ES = 1 − k/n over the n answer tokens (EOS excluded), k the first position from which the
    teacher-forced argmax is right to the end. As open-unlearning's loop (memorization.py L235-254), an
    item whose last token is wrong leaves k = n − 1, so ES = 1/n there, not 0; an empty answer scores 0. (N,)"""
    out = np.zeros(len(argmax_ok))
    for i, ok in enumerate(argmax_ok):
        n = len(ok)
        if n == 0:
            continue
        wrong = np.flatnonzero(~ok)
        k = 0 if len(wrong) == 0 else min(int(wrong[-1]) + 1, n - 1)
        out[i] = 1.0 - k / n
    return out


def exact_memorization(argmax_ok: Sequence[np.ndarray]) -> np.ndarray:
    """Per item fraction of answer tokens (EOS excluded) whose teacher-forced argmax equals the label; NaN for
    an empty answer, which the aggregate skips (open-unlearning memorization.py L190-204). (N,)"""
    return np.array([ok.mean() if len(ok) else np.nan for ok in argmax_ok], dtype=np.float64)


def min_k(token_scores: Sequence[np.ndarray], k: float) -> np.ndarray:
    """Per item mean of the floor(k·n) lowest token scores, at least one (Min-K%; with z-scores, Min-K%++);
    0 for an empty answer. open-unlearning mia/min_k.py L20-26, which returns the negation: here higher
    means member, and the AUC is the same. (N,)"""
    out = np.zeros(len(token_scores))
    for i, t in enumerate(token_scores):
        if len(t):
            out[i] = np.sort(t)[:max(1, int(len(t) * k))].mean()
    return out


MIN_K_PP_MIN_VARIANCE = 1e-6  # open-unlearning mia/min_k_plus_plus.py L32


def min_k_pp_z(s: Scores) -> list[np.ndarray]:
    """Per answer token (EOS excluded) z = (log p(x_t) − μ_t) / σ_t under the model's own next-token
    distribution, the variance clamped below at 1e-6 (open-unlearning mia/min_k_plus_plus.py L26-35)."""
    return [(lp - mu) / np.sqrt(np.maximum(sd**2, MIN_K_PP_MIN_VARIANCE)) for lp, mu, sd in zip(
        s.without_eos("token_logp"), s.without_eos("token_mu"), s.without_eos("token_sigma"), strict=True)]


def zlib_score(s: Scores, texts: Sequence[str]) -> np.ndarray:
    """Per item mean token NLL (EOS included) / the zlib-compressed length in bytes of the UTF-8 text (ZLib
    attack; low = member). `texts` are the decoded answer labels (open-unlearning mia/zlib.py L25-29). (N,)"""
    nll = -s.logp / np.maximum(s.ntokens, 1)
    return nll / np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


def privleak_value(auc_model: float, auc_oracle: float) -> float:
    """PrivLeak as MUSE and open-unlearning compute it (privacy.py L40-52): their AUC labels the forget set the
    non-member class, 1 − A for our A (forget = members, higher score = member), so
    ((1 − A) − (1 − A_oracle)) / ((1 − A_oracle) + 1e-10) × 100. ≈ 0 ideal; strongly negative: the forget set
    still looks like training data; strongly positive: it looks less familiar than unseen data."""
    ours, ref = 1.0 - auc_model, 1.0 - auc_oracle
    return (ours - ref) / (ref + 1e-10) * 100.0


# --- registered metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """One metric: its aggregate (None when unavailable, with the reason) and the per-example values behind it
    (a list, or a dict of lists for a two-sample metric such as an AUC)."""

    value: float | None
    per_example: Any = None
    reason: str | None = None


@dataclass(frozen=True)
class EvalInputs:
    """What a registered metric reads: the probes of every split of the evaluated model, and the oracle's
    per-example values and aggregates (from its eval.json) when an oracle was evaluated."""

    probes: dict[str, SplitProbes]
    oracle: dict[str, Any] | None = None
    is_oracle: bool = False
    utility_splits: tuple[str, ...] = ("real_authors", "world_facts")
    _rouge: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def rouge(self, split: str) -> np.ndarray:
        """ROUGE-L recall of a split's greedy answers, scored once per evaluation (utility reuses it)."""
        if split not in self._rouge:
            p = self.probes[split]
            self._rouge[split] = rouge_l(p.generation, p.answers)
        return self._rouge[split]


def _mean(x: np.ndarray) -> Value:
    """The mean and the per-item values; NaN items (undefined for that item) are skipped and stored as None."""
    valid = ~np.isnan(x)
    per = [float(v) if ok else None for v, ok in zip(x, valid, strict=True)]
    return Value(float(np.mean(x[valid])) if valid.any() else None, per,
                 None if valid.any() else "undefined for every item")


def split_truth_ratio(p: SplitProbes) -> np.ndarray | None:
    """Per item TR of a split against its paraphrased answers, or against the answer itself where the split has
    none (TOFU's real_authors / world_facts: `base_answer_key: answer` in config/eval_everything.yaml); None
    without perturbed answers."""
    if not p.perturbed:
        return None
    return truth_ratio(p.paraphrased if p.paraphrased is not None else p.answer, p.perturbed)


def scored_as_choice(p: SplitProbes, split: str) -> bool:
    """Whether a split's answer is scored against its perturbed answers as a choice (TOFU's real-authors and
    world-facts sets, and any further evaluation set with perturbed answers) rather than on its own. A
    multiple-choice split is not: its `_acc` / `_acc_norm` (`knowledge.py`) follow lm-evaluation-harness's order
    of options and its rule for ties, which `choice_accuracy` does not."""
    return not split.startswith(("forget", "retain", "holdout")) and bool(p.perturbed) and p.choices is None


def utility_probability(p: SplitProbes, split: str) -> np.ndarray:
    """Probability on a split as TOFU defines it: mean p on forget/retain, the choice probability
    against the perturbed answers on the real-authors/world-facts sets."""
    if not scored_as_choice(p, split):
        return p.answer.probability()
    return choice_probability(p.answer, p.perturbed or [])


@METRICS.register("probability")
def probability(x: EvalInputs) -> dict[str, Value]:
    """<split>_probability for every split (see `utility_probability`)."""
    return {f"{s}_probability": _mean(utility_probability(p, s)) for s, p in x.probes.items()}


@METRICS.register("choice_accuracy")
def accuracy(x: EvalInputs) -> dict[str, Value]:
    """<split>_accuracy on the splits scored as a choice (see `choice_accuracy`; chance is 1 / (1 + the number of
    perturbed answers))."""
    return {f"{s}_accuracy": _mean(choice_accuracy(p.answer, p.perturbed or [])) for s, p in x.probes.items()
            if scored_as_choice(p, s)}


@METRICS.register("rouge")
def rouge(x: EvalInputs) -> dict[str, Value]:
    """<split>_rouge: ROUGE-L recall of the greedy answer against the true answer."""
    return {f"{s}_rouge": _mean(x.rouge(s)) for s, p in x.probes.items() if p.generation}


@METRICS.register("truth_ratio")
def truth_ratio_metric(x: EvalInputs) -> dict[str, Value]:
    """<split>_truth_ratio: mean min(TR, 1/TR) on forget (and the attack stage's forget_* splits), mean
    max(0, 1 − TR) elsewhere (TOFU
    aggregate_eval_stat.py L66-71); the per-example values are the raw ratios TR (what forget quality compares)."""
    out = {}
    for s, p in x.probes.items():
        tr = split_truth_ratio(p)
        if tr is None:
            continue
        agg = truth_ratio_forget(tr) if s.startswith("forget") else truth_ratio_retain(tr)
        out[f"{s}_truth_ratio"] = Value(float(agg.mean()), tr.tolist())
    return out


@METRICS.register("paraphrased")
def paraphrased(x: EvalInputs) -> dict[str, Value]:
    """forget_paraphrased_probability / _rouge: the forget metrics on paraphrased questions, so that
    forgetting that holds only for the training wording shows."""
    p = x.probes.get("forget")
    if p is None or p.para_question is None:
        reason = "the forget split has no paraphrased questions"
        return {k: Value(None, reason=reason) for k in ("forget_paraphrased_probability", "forget_paraphrased_rouge")}
    out = {"forget_paraphrased_probability": _mean(p.para_question.probability())}
    if p.para_generation:
        out["forget_paraphrased_rouge"] = _mean(rouge_l(p.para_generation, p.answers))
    return out


@METRICS.register("forget_quality")
def forget_quality(x: EvalInputs) -> dict[str, Value]:
    """KS-test p-value between the per-item forget truth ratios of this model and of the retain oracle."""
    p = x.probes.get("forget")
    if x.is_oracle:
        return {"forget_quality": Value(None, reason="this is the oracle itself")}
    if x.oracle is None or "forget_truth_ratio" not in x.oracle["per_example"]:
        return {"forget_quality": Value(None, reason="no oracle evaluated: add oracle to eval.models (built by "
                                        "build-models, or given as model.oracle)")}
    ours = split_truth_ratio(p) if p is not None else None
    if ours is None:
        return {"forget_quality": Value(None, reason="the forget split has no perturbed answers")}
    theirs = np.asarray(x.oracle["per_example"]["forget_truth_ratio"], dtype=np.float64)
    return {"forget_quality": Value(ks_pvalue(ours, theirs), {"model": ours.tolist(), "oracle": theirs.tolist()})}


@METRICS.register("model_utility")
def model_utility(x: EvalInputs) -> dict[str, Value]:
    """Harmonic mean of {probability, ROUGE-L recall, truth ratio} on retain and on each utility set
    present (TOFU: real authors and world facts, 9 numbers; aggregate_eval_stat.py L73-78); per-example: the
    numbers by name."""
    splits = [s for s in ("retain", *x.utility_splits) if s in x.probes]
    terms: dict[str, float] = {}
    for s in splits:
        p = x.probes[s]
        terms[f"{s}_probability"] = float(utility_probability(p, s).mean())
        if p.generation:
            terms[f"{s}_rouge"] = float(x.rouge(s).mean())
        tr = split_truth_ratio(p)
        if tr is not None:
            terms[f"{s}_truth_ratio"] = float(truth_ratio_retain(tr).mean())
    if not terms:
        return {"model_utility": Value(None, reason="no retain or utility split to measure utility on")}
    return {"model_utility": Value(harmonic_mean(list(terms.values())), terms)}


MIA_K = 0.4  # open-unlearning configs/eval/{tofu,muse}_metrics/mia_min_k.yaml


def _mia_scores(p: SplitProbes) -> dict[str, np.ndarray]:
    """Membership scores per attack, oriented so that higher means 'member' (open-unlearning's scores are the
    negations, with the forget set labelled 0: the same ROC AUC, mia/utils.py L60-69)."""
    s = p.answer
    texts = p.label_texts if p.label_texts is not None else p.answers
    return {"loss": s.logp / np.maximum(s.ntokens, 1),
            "zlib": -zlib_score(s, texts),
            "min_k": min_k(s.without_eos("token_logp"), MIA_K),
            "min_k_pp": min_k(min_k_pp_z(s), MIA_K)}


@METRICS.register("mia")
def mia(x: EvalInputs) -> dict[str, Value]:
    """mia_<attack>_auc: ROC AUC of forget (members) vs holdout (non-members) for the LOSS, ZLib, Min-K%
    and Min-K%++ (k = 40 %) attacks; 0.5 = indistinguishable, 1 = forget set fully recognised. The values
    open-unlearning reports (its `mia_*` agg_value) for the same scores."""
    attacks = ("loss", "zlib", "min_k", "min_k_pp")
    if "forget" not in x.probes or "holdout" not in x.probes:
        return {f"mia_{a}_auc": Value(None, reason="needs forget and holdout splits") for a in attacks}
    members, nonmembers = _mia_scores(x.probes["forget"]), _mia_scores(x.probes["holdout"])
    return {f"mia_{a}_auc": Value(auc(members[a], nonmembers[a]),
                                  {"members": members[a].tolist(), "nonmembers": nonmembers[a].tolist()})
            for a in attacks}


@METRICS.register("privleak")
def privleak(x: EvalInputs) -> dict[str, Value]:
    """PrivLeak of the Min-K% (k = 40 %) attack against the oracle's (see `privleak_value`: MUSE's and
    open-unlearning's convention)."""
    if x.is_oracle:
        return {"privleak": Value(None, reason="this is the oracle itself")}
    ours = mia(x)["mia_min_k_auc"]
    theirs = (x.oracle or {}).get("metrics", {}).get("mia_min_k_auc")
    if ours.value is None or theirs is None:
        return {"privleak": Value(None, reason=ours.reason or "no oracle evaluated (its Min-K% AUC is the "
                                                     "baseline): add oracle to eval.models")}
    return {"privleak": Value(privleak_value(ours.value, theirs), {"model_auc": ours.value, "oracle_auc": theirs})}


@METRICS.register("memorization")
def memorization(x: EvalInputs) -> dict[str, Value]:
    """forget_extraction_strength and forget_exact_memorization (teacher-forced argmax on the answer tokens,
    EOS excluded, as open-unlearning's `tokenwise_vocab_logprobs`)."""
    p = x.probes.get("forget")
    if p is None:
        return {}
    ok = p.answer.without_eos("argmax_ok")
    return {"forget_extraction_strength": _mean(extraction_strength(ok)),
            "forget_exact_memorization": _mean(exact_memorization(ok))}


from unlearning.evaluate import knowledge  # noqa: E402,F401  (registration: MUSE's and WMDP's metrics)
