"""Every loss pinned to hand-computed values (arithmetic in each docstring)."""

import math

import pytest
import torch

from unlearning.methods import METHODS, RETAIN_LOSSES
from unlearning.methods.logprobs import (
    IGNORE_INDEX,
    PositionLogits,
    SequenceLogProbs,
    mean_token_nll,
    sequence_logprobs,
    token_kl,
    token_logprobs,
)


def seq(logp, ntokens, ref=None) -> SequenceLogProbs:
    t = torch.tensor
    return SequenceLogProbs(t(logp, dtype=torch.float64), t(ntokens, dtype=torch.float64),
                            None if ref is None else t(ref, dtype=torch.float64))


def test_uniform_logits_give_log_vocab_nll_on_answer_tokens_only():
    """V=4 uniform logits: every answer token has NLL log 4; prompt and pad positions are ignored."""
    logits = torch.zeros(1, 5, 4)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 3, IGNORE_INDEX]])
    logits[0, 0] = torch.tensor([9.0, -9.0, 0.0, 0.0])  # predicts a masked position: must not count
    assert mean_token_nll(logits, labels).item() == pytest.approx(math.log(4))
    seqs = sequence_logprobs(logits, labels)
    assert seqs.ntokens.tolist() == [2.0]
    assert seqs.logp.item() == pytest.approx(-2 * math.log(4))


def test_token_logprobs_shift_by_one():
    """Logits at position t score label t+1: a one-hot logit at t=0 on token 1 makes label[1]=1 certain."""
    logits = torch.full((1, 3, 2), 0.0)
    logits[0, 0] = torch.tensor([-50.0, 50.0])
    logp, mask = token_logprobs(logits, torch.tensor([[IGNORE_INDEX, 1, 0]]))
    assert mask.tolist() == [[True, True]]
    assert logp[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert logp[0, 1].item() == pytest.approx(-math.log(2))


def test_npo_at_log_ratio_zero_is_two_over_beta_log_two():
    """σ(0) = 1/2, so L = −(2/β)·log(1/2) = (2/β)·log 2; β=0.1 gives 20·log 2 ≈ 13.863."""
    loss = METHODS.get("npo").fn(seq([-3.0, -5.0], [2, 4], ref=[-3.0, -5.0]), beta=0.1)
    assert loss.item() == pytest.approx(20 * math.log(2))


def test_npo_with_a_log_ratio():
    """β=1, logπ−logπ_ref = log 3: σ(−log 3) = 1/4, so L = −2·log(1/4) = 2·log 4 ≈ 2.7726."""
    loss = METHODS.get("npo").fn(seq([math.log(3) - 1.0], [1], ref=[-1.0]), beta=1.0)
    assert loss.item() == pytest.approx(2 * math.log(4))


def test_npo_needs_reference():
    with pytest.raises(ValueError, match="reference"):
        METHODS.get("npo").fn(seq([-1.0], [1]), beta=0.1)


def test_simnpo_is_length_normalised():
    """logπ=−6 over 3 tokens → NLL/|y| = 2. β=1, δ=0: −2·log σ(2) = 2·log(1+e^−2) ≈ 0.253856.
    With δ=2 the argument is 0: 2·log 2."""
    fn = METHODS.get("simnpo").fn
    assert fn(seq([-6.0], [3]), beta=1.0, delta=0.0).item() == pytest.approx(2 * math.log1p(math.exp(-2)))
    assert fn(seq([-6.0], [3]), beta=1.0, delta=2.0).item() == pytest.approx(2 * math.log(2))


def test_gradient_ascent_is_negated_mean_token_nll():
    """logπ = [−2, −4] over [1, 3] tokens: Σlogπ/Σ|y| = −6/4 = −1.5 (minimising raises the NLL)."""
    for name in ("ga", "graddiff"):
        assert METHODS.get(name).fn(seq([-2.0, -4.0], [1, 3])).item() == pytest.approx(-1.5)
    # The forget fine-tune of task arithmetic descends the same quantity: +1.5.
    assert METHODS.get("finetune").fn(seq([-2.0, -4.0], [1, 3])).item() == pytest.approx(1.5)


def test_idkdpo_zero_margin_and_sign():
    """Equal log-ratios on both answers: margin 0 → (2/β)·log 2. Raising the idk answer's log-ratio by
    log 3 with β=1: σ(log 3) = 3/4 → −2·log(3/4) ≈ 0.575364."""
    fn = METHODS.get("idkdpo").fn
    forget = seq([-4.0], [2], ref=[-3.0])
    assert fn(forget, seq([-2.0], [2], ref=[-1.0]), beta=0.5).item() == pytest.approx(4 * math.log(2))
    idk = seq([math.log(3) - 2.0], [2], ref=[-1.0])  # idk log-ratio −1 + log 3; forget log-ratio −1
    assert fn(forget, idk, beta=1.0).item() == pytest.approx(-2 * math.log(0.75))


def test_kl_hand_value_and_padding_ignored():
    """Vocab 2, p_ref=(1/2,1/2), p_θ=(1/4,3/4): KL = ½log2 + ½log(2/3) ≈ 0.143841.
    A padded position with wildly different logits must not change the average."""
    ref = torch.zeros(1, 3, 2)
    cur = torch.zeros(1, 3, 2)
    cur[0, :, 1] = math.log(3)  # softmax(0, log 3) = (1/4, 3/4)
    cur[0, 1] = torch.tensor([40.0, -40.0])  # position 1 predicts the padded token 2
    mask = torch.tensor([[1, 1, 0]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert token_kl(ref, cur, mask).item() == pytest.approx(expected, rel=1e-6)
    assert token_kl(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_retain_losses_are_registered():
    assert RETAIN_LOSSES.names() == ["embed_diff", "kl", "nll"]
    logits, labels = torch.zeros(1, 3, 4), torch.tensor([[IGNORE_INDEX, 1, 2]])
    batch = {"labels": labels, "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    uniform = sequence_logprobs(logits, labels)  # 2 answer tokens at log(1/4) each
    assert RETAIN_LOSSES.get("nll").fn(uniform).item() == pytest.approx(math.log(4))
    assert RETAIN_LOSSES.get("nll").fn(uniform.with_norm(torch.tensor(4.0))).item() == pytest.approx(math.log(4) / 2)
    whole = PositionLogits(logits, batch["attention_mask"])
    assert RETAIN_LOSSES.get("kl").fn(whole, whole).item() == pytest.approx(0.0)


def test_step_norm_replaces_the_micro_batch_token_count():
    """Two micro-batches, 1 and 3 answer tokens, logπ −2 and −4: the step's token mean is −6/4 = −1.5.
    With norm = 4/2 = 2 (step tokens / micro-batches), each micro loss is Σlogπ/2 and their average is
    (−2/2 − 4/2)/2 = −1.5, whereas averaging the micro means gives (−2/1 − 4/3)/2 ≈ −1.667."""
    ga = METHODS.get("ga").fn
    norm = torch.tensor(2.0, dtype=torch.float64)
    parts = [ga(seq([-2.0], [1]).with_norm(norm)), ga(seq([-4.0], [3]).with_norm(norm))]
    assert (sum(parts) / 2).item() == pytest.approx(-1.5)
    assert ((ga(seq([-2.0], [1])) + ga(seq([-4.0], [3]))) / 2).item() == pytest.approx(-5 / 3)
    logits, labels = torch.zeros(1, 3, 4), torch.tensor([[IGNORE_INDEX, 1, 2]])
    assert mean_token_nll(logits, labels, torch.tensor(4.0)).item() == pytest.approx(2 * math.log(4) / 4)


def test_registered_methods_and_their_defaults():
    assert METHODS.names() == ["altpo", "ceu", "finetune", "ga", "graddiff", "icul", "idkdpo", "instruct", "kga",
                               "npo", "pdu", "rmu", "satimp", "simnpo", "undial", "wga"]
    assert METHODS.get("npo").meta["cached_ref"] is True
    assert METHODS.get("simnpo").defaults() == {"beta": 4.5, "delta": 0.0}
