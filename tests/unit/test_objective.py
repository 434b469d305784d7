"""The objective runs only the forwards a method's declared reads need, and the per-token losses computed
through it (kept logits, packed rows, a forward hook) equal the same losses from full logits."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearning.config import _resolve_method
from unlearning.methods.answers import layouts
from unlearning.methods.logprobs import IGNORE_INDEX, token_logprobs
from unlearning.schema import MethodConfig
from unlearning.train.objective import Reference, UnlearningObjective
from unlearning.train.sampler import Stream


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def rows(seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for q, a in ((3, 2), (7, 6), (4, 3), (5, 5)):
        ids = torch.randint(1, 61, (q + a,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * q + ids[q:], "attention_mask": [1] * (q + a)})
    return out


def batch():
    """One micro-batch of each stream, the whole optimizer step (normalisers over these 4 items)."""
    ref = {"ref_logp": torch.tensor([-9.0, -30.0, -12.0, -20.0], dtype=torch.float64)}
    streams = {"forget": Stream(rows(1), "forget", ref), "idk": Stream(rows(2), "idk", ref),
               "retain": Stream(rows(3), "retain")}
    return {name: s.batch([0, 1, 2, 3], [0, 1, 2, 3], 1, pad_id=0) for name, s in streams.items()}


def method(**raw) -> MethodConfig:
    resolved, problems = _resolve_method(raw)
    assert not problems
    return MethodConfig(**resolved)


class Counted:
    """Counts the forwards of a model."""

    def __init__(self, module):
        self.module, self.calls = module, 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


@pytest.mark.parametrize(("raw", "live", "reference"), [
    ({"name": "ga"}, 1, 0),
    ({"name": "graddiff"}, 2, 0),
    ({"name": "graddiff", "retain_loss": "kl"}, 2, 1),
    ({"name": "npo"}, 2, 0),
    ({"name": "idkdpo"}, 3, 0),
    ({"name": "simnpo"}, 2, 0),
    ({"name": "wga"}, 2, 0),
    ({"name": "satimp"}, 2, 0),
    ({"name": "ceu"}, 1, 0),
    ({"name": "undial"}, 1, 1),
    ({"name": "rmu", "layer": "model.layers.0"}, 2, 1),
    ({"name": "pdu", "retain_loss_eps": 1.0}, 2, 0),
])
def test_each_method_runs_only_the_forwards_it_reads(model, raw, live, reference):
    trained, frozen = copy.deepcopy(model), copy.deepcopy(model)
    layouts(trained), layouts(frozen)  # the once-per-model probe of what its forward honours
    live_calls, ref_calls = Counted(trained), Counted(frozen)
    objective = UnlearningObjective(method(**raw), Reference(frozen))
    loss, metrics = objective(trained, batch())
    assert torch.isfinite(loss) and {"loss", "forget_loss", "forget_nll"} <= set(metrics)
    assert (live_calls.calls, ref_calls.calls) == (live, reference)


def test_a_method_reading_the_reference_needs_one():
    with pytest.raises(ValueError, match="reference"):
        UnlearningObjective(method(name="undial"))


def full_token_logp(model, part):
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    return token_logprobs(logits, part["labels"]), logits


@pytest.mark.parametrize("pack", [False, True])
def test_wga_through_the_objective_equals_the_full_logits_loss(model, pack):
    b = batch()
    (logp, mask), _ = full_token_logp(model, b["forget"])
    expected = (logp.exp() * logp)[mask].mean()
    _, metrics = UnlearningObjective(method(name="wga", alpha=0.0), pack=pack)(model, b)
    torch.testing.assert_close(metrics["forget_loss"], expected.detach(), atol=1e-6, rtol=1e-5, check_dtype=False)


def test_undial_through_the_objective_equals_the_full_logits_loss(model):
    b = batch()
    torch.manual_seed(5)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    part = b["forget"]
    (_, mask), logits = full_token_logp(model, part)
    _, ref_logits = full_token_logp(ref, part)
    targets = part["labels"][:, 1:]
    adjusted = ref_logits[:, :-1] - 10.0 * torch.nn.functional.one_hot(targets.clamp(min=0), 61)
    ce = -(adjusted.softmax(-1) * logits[:, :-1].log_softmax(-1)).sum(-1)
    _, metrics = UnlearningObjective(method(name="undial"), Reference(ref))(model, b)
    expected = ce[mask].mean().detach()
    torch.testing.assert_close(metrics["forget_loss"], expected, atol=1e-6, rtol=1e-5, check_dtype=False)


def test_rmu_reads_the_named_layer_output(model):
    b = batch()
    part = b["forget"]
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=True)
    states = out.hidden_states[1]  # the output of model.layers.0
    from unlearning.methods.rmu import steering_vector

    diff = (states - steering_vector(32, 2.0, 0)).pow(2).mean(-1)
    answer = (part["labels"] != IGNORE_INDEX).float()
    expected = ((diff * answer).sum(-1) / answer.sum(-1)).mean()
    _, metrics = UnlearningObjective(method(name="rmu", layer="model.layers.0", alpha=0.0))(model, b)
    torch.testing.assert_close(metrics["forget_loss"], expected.detach(), atol=1e-6, rtol=1e-5, check_dtype=False)


def test_the_dual_retain_weight_is_used_updated_and_restored_on_resume(model):
    """PDU's loss is γ·forget + λ·retain with λ from alpha, then updated from each step's record; a resumed
    run recomputes λ from the last recorded step."""
    objective = UnlearningObjective(method(name="pdu", alpha=2.0, retain_loss_eps=0.5, dual_step_size=1.0,
                                           dual_warmup_epochs=0.0))
    loss, metrics = objective(model, batch())
    assert metrics["retain_weight"].item() == 2.0
    assert loss.item() == pytest.approx(metrics["forget_loss"].item() + 2.0 * metrics["retain_loss"].item(), rel=1e-6)
    record = {"step": 1, **{k: v.item() for k, v in metrics.items()}}
    objective.after_step(record, epoch=1.0)
    assert objective.retain_weight == pytest.approx(2.0 + record["retain_loss"] - 0.5)
    again = UnlearningObjective(method(name="pdu", alpha=2.0, retain_loss_eps=0.5, dual_step_size=1.0,
                                       dual_warmup_epochs=0.0))
    again.resume([record], steps_per_epoch=3)
    assert again.retain_weight == objective.retain_weight
