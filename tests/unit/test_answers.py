"""Answer log-probs from the kept logits only, padded or packed, equal the plain full-logits computation;
models that ignore `logits_to_keep` or packed position ids fall back to the plain path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearning.data.tokenize import collate
from unlearning.methods.answers import Layouts, answer_logprobs_of, layouts
from unlearning.methods.logprobs import IGNORE_INDEX, answer_layout, packing_pays, sequence_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def rows():
    """Questions of 3-7 tokens, answers of 1-6 tokens: lengths 4 to 13, so the batch pads a lot."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for q, a in ((3, 1), (7, 6), (4, 2), (5, 5)):
        ids = torch.randint(1, 61, (q + a,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * q + ids[q:]})
    return out


def full(model, batch):
    return sequence_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             batch["labels"])


def test_layout_keeps_exactly_the_positions_that_predict_answer_tokens():
    batch = collate(rows(), pad_id=0)
    padded, packed = answer_layout(batch, pack=False), answer_layout(batch, pack=True)
    assert padded.keep.shape == (4, 13) and packed.keep.shape == (1, 4 + 13 + 6 + 10)
    assert int(padded.keep.sum()) == int(packed.keep.sum()) == 1 + 6 + 2 + 5
    assert padded.keep[0].nonzero().flatten().tolist() == [2]  # question of 3 tokens: position 2 predicts the answer
    assert packed.inputs["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 0, 1]  # restarts at each sequence
    assert "attention_mask" not in packed.inputs
    assert packed.owner.tolist() == padded.owner.tolist() == [0] + [1] * 6 + [2] * 2 + [3] * 5


@pytest.mark.parametrize("pack", [False, True])
def test_kept_logits_give_the_full_logits_log_probs_and_gradients(model, pack):
    batch = collate(rows(), pad_id=0)
    assert layouts(model) == Layouts(keep=True, pack=True)
    expected = full(model, batch)
    model.zero_grad()
    expected.logp.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    got = answer_logprobs_of(model, batch, pack=pack)
    got.logp.sum().backward()
    torch.testing.assert_close(got.logp, expected.logp, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.ntokens, expected.ntokens)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], atol=1e-5, rtol=1e-4)


def test_packing_pays_when_padding_outweighs_the_longer_attention():
    """h=64: a token costs 6h=384 units of linear work, a query-key pair 1. [2, 30]: packed 32 tokens,
    32·384 + 32² = 13312 < padded 2·30·384 + 2·30² = 24840. [1000, 900]: packed 1900·384 + 1900² = 4339600
    > padded 2000·384 + 2·1000² = 2768000. No padding: never."""
    assert packing_pays([2, 30], 64)
    assert not packing_pays([1000, 900], 64)
    assert not packing_pays([10, 10, 10], 64)


class IgnoresPositions(torch.nn.Module):
    """A model that reads neither `logits_to_keep` nor packed position ids (like much remote code)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_that_ignores_them_falls_back_to_the_plain_path(model):
    wrapped = IgnoresPositions(model)
    assert layouts(wrapped) == Layouts(keep=False, pack=False)
    batch = collate(rows(), pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(answer_logprobs_of(wrapped, batch).logp, full(model, batch).logp,
                                   atol=1e-5, rtol=1e-5)


class FailsWhenAskedToKeep(torch.nn.Module):
    """A model whose forward fails in the kept-logits layout with `error`: unsupported, or a real failure."""

    def __init__(self, inner, error: Exception):
        super().__init__()
        self.inner, self.config, self.error = inner, inner.config, error

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=None):
        if logits_to_keep is not None:
            raise self.error
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_the_probe_falls_back_on_unsupported_layouts_but_never_hides_a_real_failure(model):
    """A shape error in the kept layout means "unsupported" (fall back); an out-of-memory or process-group error
    is a failure of the run and must propagate, not turn into a silent fallback."""
    assert not layouts(FailsWhenAskedToKeep(model, RuntimeError("The size of tensor a (6) must match"))).keep
    with pytest.raises(torch.OutOfMemoryError):
        layouts(FailsWhenAskedToKeep(model, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        layouts(FailsWhenAskedToKeep(model, RuntimeError("DefaultCPUAllocator: can't allocate memory")))
