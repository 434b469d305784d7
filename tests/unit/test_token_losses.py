"""The per-token and activation losses (WGA, SatImp, CE-U, UNDIAL, RMU, embed_diff) pinned to hand-computed
values, and what a method may read (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from tests.unit.test_losses import seq
from unlearning.methods import METHODS, RETAIN_LOSSES, Read, parse_read, reads
from unlearning.methods.logprobs import IGNORE_INDEX, AnswerTokens, HiddenStates, answer_layout, sequence_logprobs
from unlearning.methods.rmu import steering_vector
from unlearning.registry import Registry

LOG3 = math.log(3)


def tokens(rows, targets, owner, **kw) -> AnswerTokens:
    logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    return AnswerTokens(logits, torch.tensor(targets), torch.tensor(owner), max(owner) + 1, **kw)


def two_tokens() -> AnswerTokens:
    """Vocab 4, target 0: a uniform row (p = 1/4) and (log 3, 0, 0, 0) (p = 3/6 = 1/2)."""
    return tokens([[0.0, 0, 0, 0], [LOG3, 0, 0, 0]], [0, 0], [0, 1])


def test_wga_weighs_each_token_by_its_detached_probability():
    """β=1: mean(p·log p) = (¼·log ¼ + ½·log ½)/2 = −(log 2)/2; β=2: (−2log2/16 − log2/4)/2 = −(3/16)·log 2.
    The weight is detached: ∂L/∂z₀ of the second row is p^β·(1 − p)/M = ½·½/2 = 1/8."""
    wga = METHODS.get("wga").fn
    t = two_tokens()
    loss = wga(t, beta=1.0)
    assert loss.item() == pytest.approx(-math.log(2) / 2)
    loss.backward()
    assert t.logits.grad[1, 0].item() == pytest.approx(1 / 8)
    assert wga(two_tokens(), beta=2.0).item() == pytest.approx(-3 / 16 * math.log(2))


def test_satimp_weighs_by_saturation_and_importance():
    """β1=5, β2=1: w = p⁵(1 − p): 3/4096 at p = ¼, 1/64 at p = ½;
    L = (3/4096·(−2 log 2) + 1/64·(−log 2))/2 = −35·log 2/4096."""
    loss = METHODS.get("satimp").fn(two_tokens(), beta1=5.0, beta2=1.0)
    assert loss.item() == pytest.approx(-35 * math.log(2) / 4096)
    assert METHODS.get("satimp").meta["gamma"] == 0.1


def test_ceu_pulls_toward_the_other_tokens_and_skips_the_first_answer_tokens():
    """One answer of three tokens, target 0, vocab 4. q = softmax with the target at −∞ = ⅓ on each other
    token. Uniform row: CE = log 4; row (log 3, 0, 0, 0): p_other = 1/6, CE = log 6; row (5, 0, 0, 0):
    p_other = 1/(e⁵ + 3), CE = log(e⁵ + 3). n = 1 skips the first row: (log 4 + log 6)/2. With the step's
    answer lengths (3, 2) over 2 micro-batches the normaliser is ((3−1) + (2−1))/2 = 1.5."""
    ceu = METHODS.get("ceu").fn
    rows = [[5.0, 0, 0, 0], [0.0, 0, 0, 0], [LOG3, 0, 0, 0]]
    t = tokens(rows, [0, 0, 0], [0, 0, 0])
    assert ceu(t, ignore_first_n_answer_tokens=1).item() == pytest.approx((math.log(4) + math.log(6)) / 2)
    everything = (math.log(math.exp(5) + 3) + math.log(4) + math.log(6)) / 3
    assert ceu(t, ignore_first_n_answer_tokens=0).item() == pytest.approx(everything)
    stepped = tokens(rows, [0, 0, 0], [0, 0, 0], step_counts=torch.tensor([3.0, 2.0]), micro_batches=2)
    assert ceu(stepped, ignore_first_n_answer_tokens=1).item() == pytest.approx((math.log(4) + math.log(6)) / 1.5)
    loss = ceu(t, ignore_first_n_answer_tokens=1)
    loss.backward()  # ∂CE/∂z = p − q: at the uniform row's target ¼ − 0, over 2 tokens
    assert t.logits.grad[1, 0].item() == pytest.approx(1 / 8)
    assert t.logits.grad[0].abs().sum().item() == 0.0


def test_undial_distils_the_reference_with_the_true_token_lowered():
    """Reference logits 0, target 0, β = log 3: soft label softmax(−log 3, 0) = (¼, ¾). A uniform student:
    CE = log 2; a student equal to the soft label: CE = H(¼, ¾) = −¼log¼ − ¾log¾."""
    undial = METHODS.get("undial").fn
    ref = tokens([[0.0, 0.0]], [0], [0])
    assert undial(tokens([[0.0, 0.0]], [0], [0]), ref, beta=LOG3).item() == pytest.approx(math.log(2))
    matched = undial(tokens([[0.0, LOG3]], [0], [0]), ref, beta=LOG3).item()
    assert matched == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_rmu_steers_the_answer_activations_to_a_fixed_random_vector():
    """States minus the steering vector: sequence 0 has one answer position at distance mean_d(1, 1) = 1
    (its masked position is far off and ignored); sequence 1 has two, at mean_d(4, 0) = 2 and 0, so 1:
    the loss is 1. The vector has norm c and is the same for the same seed."""
    u = steering_vector(2, 2.0, seed=0)
    assert u.shape == (1, 1, 2) and u.norm().item() == pytest.approx(2.0)
    assert torch.equal(u, steering_vector(2, 2.0, seed=0)) and not torch.equal(u, steering_vector(2, 2.0, seed=1))
    offsets = torch.tensor([[[9.0, 9.0], [1.0, -1.0]], [[2.0, 0.0], [0.0, 0.0]]])
    hidden = HiddenStates(u + offsets, torch.tensor([[False, True], [True, True]]))
    assert METHODS.get("rmu").fn(hidden, steering_coeff=2.0, seed=0).item() == pytest.approx(1.0)


def test_embed_diff_matches_activations_to_the_reference_without_moving_it():
    states = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    ref = torch.zeros(1, 1, 2, requires_grad=True)
    mask = torch.tensor([[True]])
    loss = RETAIN_LOSSES.get("embed_diff").fn(HiddenStates(states, mask), HiddenStates(ref, mask))
    assert loss.item() == pytest.approx(5.0)  # (1 + 9)/2
    loss.backward()
    assert ref.grad is None and states.grad.tolist() == [[[1.0, 3.0]]]


def test_answer_tokens_positions_sums_and_step_normaliser():
    """Two sequences: the answer positions come out in order, position() restarts at 0 per answer, the
    per-sequence sums equal sequence_logprobs of the full logits, and count_from(1) = Σ max(c − 1, 0)/k."""
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 1, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels,
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    logits = torch.randn(2, 5, 6)
    layout = answer_layout(batch, pack=False)
    t = AnswerTokens(logits[layout.keep], layout.targets, layout.owner, 2,
                     step_counts=torch.tensor([3.0, 2.0, 4.0, 1.0]), micro_batches=2)
    assert t.position().tolist() == [0, 1, 2, 0, 1]
    full = sequence_logprobs(logits, labels)
    torch.testing.assert_close(t.sequences().logp, full.logp)
    assert t.count_from(1).item() == pytest.approx((2 + 1 + 3 + 0) / 2)


def test_what_a_method_reads_is_its_positional_parameters():
    assert parse_read("ref_retain_hidden") == Read("retain", "hidden", "ref")
    assert parse_read("forget") == Read("forget", "", "") and parse_read("beta") is None
    assert parse_read("aux_forget_tokens") == Read("forget", "tokens", "aux")
    assert parse_read("forget_const") == Read("forget", "const", "") and parse_read("ref_forget_const") is None
    assert list(reads(METHODS.get("kga"))) == ["forget_tokens", "aux_forget_tokens", "forget_const"]
    assert list(reads(METHODS.get("undial"))) == ["forget_tokens", "ref_forget_tokens"]
    assert list(reads(METHODS.get("idkdpo"))) == ["forget", "idk"]
    assert list(reads(RETAIN_LOSSES.get("kl"))) == ["retain_logits", "ref_retain_logits"]


def test_registration_refuses_a_malformed_method():
    from unlearning.methods import _check_method

    bad = Registry("method", check=_check_method)
    with pytest.raises(ValueError, match="not reads"):
        bad.register("typo")(lambda forget_tokenz: forget_tokenz)
    with pytest.raises(ValueError, match="retain"):
        bad.register("wrong_stream")(lambda retain: retain)
    with pytest.raises(ValueError, match="layer"):
        bad.register("no_layer")(lambda forget_hidden: forget_hidden)
    with pytest.raises(ValueError, match="cached_ref"):
        bad.register("ref_unread", cached_ref=True)(lambda forget_tokens: forget_tokens)
    with pytest.raises(ValueError, match="auxiliary"):
        bad.register("no_aux")(lambda aux_forget_tokens: aux_forget_tokens)
    with pytest.raises(ValueError, match="constants"):
        bad.register("no_constants")(lambda forget_tokens, forget_const: forget_const)


def test_pdu_flattens_the_answer_logits_and_its_dual_weight_follows_the_retain_constraint():
    """Rows (3, 0, 0, 1): (max − mean)² = (3 − 1)² = 4, and uniform: 0; the mean is 2. The dual weight
    after a step with retain loss 1.5 against ε = 1: 2 + 0.5·(1.5 − 1) = 2.25; one under ε lowers it, never
    below 0; during the warm-up epochs it stays."""
    from unlearning.methods.pdu import dual_update

    t = tokens([[3.0, 0, 0, 1], [0.0, 0, 0, 0]], [0, 0], [0, 1])
    assert METHODS.get("pdu").fn(t, retain_loss_eps=1.0).item() == pytest.approx(2.0)
    params = {"retain_loss_eps": 1.0, "dual_step_size": 0.5, "dual_warmup_epochs": 1.0, "primal_dual": True}
    assert dual_update(2.0, {"retain_loss": 1.5}, epoch=1.0, **params) == pytest.approx(2.25)
    assert dual_update(0.1, {"retain_loss": 0.0}, epoch=3.0, **params) == 0.0
    assert dual_update(2.0, {"retain_loss": 1.5}, epoch=0.5, **params) == 2.0
    assert dual_update(2.0, {"retain_loss": 1.5}, epoch=9.0, **{**params, "primal_dual": False}) == 2.0


def test_altpo_is_dpo_preferring_the_alternative_and_choice_of_alternatives():
    """Zero margin: (2/β)·log 2. An alternative the model made likelier (log-ratio +1 against the true
    answer's −1, β = 1): −2·log σ(2). A sample equal to the true answer up to case and punctuation is no
    alternative; then a perturbed answer; then the refusal."""
    from unlearning.data.alternatives import choose

    fn = METHODS.get("altpo").fn
    same = seq([-3.0], [2], ref=[-3.0])
    assert fn(same, same, beta=0.1).item() == pytest.approx(20 * math.log(2))
    assert fn(seq([-4.0], [2], ref=[-3.0]), seq([-2.0], [2], ref=[-3.0]), beta=1.0).item() == pytest.approx(
        -2 * math.log(1 / (1 + math.exp(-2))))
    assert choose("Paris.", ["paris", " Lyon. "], ["Rome.", "I don't know."]) == ("Lyon.", "generated")
    assert choose("Paris.", ["Paris!", ""], ["Rome.", "I don't know."]) == ("Rome.", "perturbed")
    assert choose("Paris.", [], ["I don't know."]) == ("I don't know.", "refusal")


def test_kga_aligns_each_forget_items_gap_with_its_paired_new_items_gap():
    """Vocab 2. Student rows uniform (½, ½), A_f rows (log 3, 0) → (¾, ¼): KL(A_f ‖ A*) = ¾·log(3/2) + ¼·log(½)
    = ¾·log 3 − log 2 =: k per token, so sequence 0 (two such tokens) has mean gap k; sequence 1's one token equals
    A_f's: gap 0. Paired new-data gaps (0.5, 0.25): L = (|k − 0.5| + |0 − 0.25|)/2. Sequence 0's gap is under its
    constant, so descending the loss moves the student away from A_f there: ∂L/∂z₀ of its first row is
−½ (the |·| below its constant, over 2 items) · ½ (over 2 tokens) · (p_s − p_f)₀ = −¼·(½ − ¾) = 1/16 > 0, so a
step lowers the logit A_f prefers. A_f gets no gradient."""
    kga = METHODS.get("kga").fn
    k = 0.75 * LOG3 - math.log(2)
    student = tokens([[0.0, 0.0], [0.0, 0.0], [LOG3, 0.0]], [0, 0, 0], [0, 0, 1])
    aux = tokens([[LOG3, 0.0], [LOG3, 0.0], [LOG3, 0.0]], [0, 0, 0], [0, 0, 1])
    loss = kga(student, aux, torch.tensor([0.5, 0.25]))
    assert loss.item() == pytest.approx((0.5 - k + 0.25) / 2)
    loss.backward()
    assert student.logits.grad[0, 0].item() == pytest.approx(1 / 16, rel=1e-5) and aux.logits.grad is None
    assert METHODS.get("kga").meta["auxiliary"]({"new_data": "holdout"}) == {"aux": ("forget",), "new": ("holdout",)}


def test_kl_between_answer_tokens_of_two_models_is_zero_for_the_same_logits():
    """kl_from: KL(p_fixed ‖ p_self) per row; (¾, ¼) against (½, ½) is ¾·log 3 − log 2, and 0 against itself."""
    a, b = tokens([[LOG3, 0.0]], [0], [0]), tokens([[0.0, 0.0]], [0], [0])
    assert b.kl_from(a).item() == pytest.approx(0.75 * LOG3 - math.log(2))
    assert a.kl_from(a).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="answer positions differ"):
        a.kl_from(tokens([[0.0, 0.0], [0.0, 0.0]], [0, 0], [0, 1]))
