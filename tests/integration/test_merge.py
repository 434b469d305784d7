"""Streamed task arithmetic on pico checkpoints: identities, byte equality with an in-memory merge,
sharding, LoRA task vectors, bad input; and the merge stage with its λ sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import MEMORISE
from unlearning.errors import UserError
from unlearning.merge.safetensors_io import checkpoint_tensors
from unlearning.merge.streaming import merge_checkpoints
from unlearning.models import build_models


def pico_llama(seed: int, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}
    cfg = LlamaConfig(**{**sizes, **overrides})
    return LlamaForCausalLM(cfg).to(dtype)


def save(model: torch.nn.Module, path: Path, shard: str = "50GB") -> Path:
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=shard)
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
        path / f for f in set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def in_memory(base: dict[str, torch.Tensor], tasks: list[tuple[dict[str, torch.Tensor], float]]) -> dict:
    """The same arithmetic with every tensor loaded: float32 base + Σ w·(θ − base), back to the dtype."""
    out = {}
    for k, b in base.items():
        if not b.dtype.is_floating_point:
            out[k] = b
            continue
        acc = b.float().clone()
        for t, w in tasks:
            acc.add_(t[k].float() - b.float(), alpha=w)
        out[k] = acc.to(b.dtype)
    return out


@pytest.fixture
def pair(tmp_path):
    return save(pico_llama(0), tmp_path / "base"), save(pico_llama(1), tmp_path / "task")


def test_lambda_zero_returns_the_base_bit_for_bit(pair, tmp_path):
    base, task = pair
    merge_checkpoints(base, [(task, -0.0)], tmp_path / "out")
    got, want = state(tmp_path / "out"), state(base)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_in_memory_merge_byte_for_byte(pair, tmp_path, dtype):
    base = save(pico_llama(0, dtype), tmp_path / f"base-{dtype}")
    t1, t2 = save(pico_llama(1, dtype), tmp_path / f"t1-{dtype}"), save(pico_llama(2, dtype), tmp_path / f"t2-{dtype}")
    # Tiny chunks: every tensor is merged a few rows at a time, which must not change a single byte.
    merge_checkpoints(base, [(t1, -2.5), (t2, 0.75)], tmp_path / "out", chunk_bytes=64)
    got = state(tmp_path / "out")
    want = in_memory(state(base), [(state(t1), -2.5), (state(t2), 0.75)])
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


def test_negating_twice_is_the_identity(pair, tmp_path):
    """Reflecting θ through the base twice, base − (base − (θ − base) − base), gives θ back; not bit for
    bit, because 2·base − θ is rounded to float32 in between: to within a few float32 ulps of θ."""
    base, task = pair
    merge_checkpoints(base, [(task, -1.0)], tmp_path / "once")
    merge_checkpoints(base, [(tmp_path / "once", -1.0)], tmp_path / "twice")
    got, want = state(tmp_path / "twice"), state(task)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=4 * torch.finfo(torch.float32).eps * 4)
    assert not torch.equal(state(tmp_path / "once")["model.embed_tokens.weight"], want["model.embed_tokens.weight"])


def test_sharded_input_and_output_round_trip_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save(pico_llama(0), tmp_path / "base", shard="20KB")
    task = save(pico_llama(1), tmp_path / "task", shard="12KB")  # sharded differently
    assert (base / "model.safetensors.index.json").is_file() and (task / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    info = merge_checkpoints(base, [(task, -1.5)], out, max_shard_bytes=10_000)
    assert len(info["files"]) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in checkpoint_tensors(out).values())
    model = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    want = in_memory(state(base), [(state(task), -1.5)])
    loaded = model.state_dict()
    for k, v in want.items():
        assert torch.equal(loaded[k], v), k
    assert json.loads((out / "merge.json").read_text())["tasks"][0]["weight"] == -1.5


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save(pico_llama(0, tie_word_embeddings=True), tmp_path / "base")
    task = save(pico_llama(1, tie_word_embeddings=True), tmp_path / "task")
    merge_checkpoints(base, [(task, -1.0)], tmp_path / "out")
    assert "lm_head.weight" not in checkpoint_tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_integer_buffers_are_copied_and_dtypes_kept(tmp_path):
    for name, seed in (("base", 0), ("task", 1)):
        d = tmp_path / name
        d.mkdir()
        torch.manual_seed(seed)
        save_file({"w": torch.randn(4, 3), "h": torch.randn(5).half(), "steps": torch.arange(6) + seed,
                   "mask": torch.tensor([True, False]) ^ bool(seed)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    merge_checkpoints(tmp_path / "base", [(tmp_path / "task", -1.0)], tmp_path / "out")
    got, base = state(tmp_path / "out"), state(tmp_path / "base")
    assert torch.equal(got["steps"], base["steps"]) and torch.equal(got["mask"], base["mask"])
    assert got["h"].dtype == torch.float16 and got["w"].dtype == torch.float32


def test_lora_negation_equals_negating_the_merged_dense_delta(tmp_path):
    """An adapter's task vector scale·B·A negated directly = the dense fine-tune peft merges, negated."""
    from peft import LoraConfig, get_peft_model

    base = save(pico_llama(0), tmp_path / "base")
    peft_model = get_peft_model(pico_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # peft starts B at zero; a trained adapter is not
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    save(peft_model.merge_and_unload(), tmp_path / "dense")
    merge_checkpoints(base, [(tmp_path / "adapter", -3.0)], tmp_path / "from_lora")
    merge_checkpoints(base, [(tmp_path / "dense", -3.0)], tmp_path / "from_dense")
    a, b = state(tmp_path / "from_lora"), state(tmp_path / "from_dense")
    touched = [k for k in a if "q_proj" in k or "v_proj" in k]
    assert touched and all(not torch.equal(a[k], state(base)[k]) for k in touched)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bad_inputs_are_reported_before_anything_is_written(tmp_path):
    base = save(pico_llama(0), tmp_path / "base")
    wider = save(pico_llama(1, head_dim=16), tmp_path / "wider")  # same names, different shapes
    with pytest.raises(UserError) as err:
        merge_checkpoints(base, [(wider, -1.0)], tmp_path / "out")
    assert "q_proj.weight has shape [32, 16], the base [16, 16]" in str(err.value)
    missing = tmp_path / "missing"
    missing.mkdir()
    full = state(save(pico_llama(1), tmp_path / "full"))
    save_file({k: v for k, v in full.items() if "layers.1." not in k}, str(missing / "model.safetensors"))
    (missing / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is missing"):
        merge_checkpoints(base, [(missing, -1.0)], tmp_path / "out")
    other = save(pico_llama(1, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(UserError, match=r"different architecture.*num_hidden_layers 2 vs 3"):
        merge_checkpoints(base, [(other, -1.0)], tmp_path / "out")
    half = save(pico_llama(1, torch.float16), tmp_path / "half")
    with pytest.raises(UserError, match=r"dtype torch\.float16, the base torch\.float32"):
        merge_checkpoints(base, [(half, -1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_merge_that_fails_midway_leaves_no_output(pair, tmp_path, monkeypatch):
    from unlearning.merge import streaming

    calls = {"n": 0}
    real = streaming.read_rows

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # a few tensors in, the disk goes away
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "read_rows", flaky)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(*pair[:1], [(pair[1], -1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_merge_stage_sweeps_lambda_and_negation_lowers_forget_probability(pico):
    from unlearning.merge.stage import merge

    cfg = pico(model={"finetune": MEMORISE}, train={"num_processes": 1, "batch_size": 4},
               merge={"lambdas": [0.0, 1.0, 4.0], "finetune": {"lr": 3e-3, "max_steps": 6}})
    done = merge(cfg)
    probs = done.summary["probability"]
    assert set(probs) == {"target", "finetuned", "merged_l0", "merged_l1", "merged_l4"}
    assert probs["merged_l0"] == probs["target"]
    target, zero = state(build_models(cfg).target), state(done.models[0.0])  # λ = 0 is the target, byte for byte
    assert zero.keys() == target.keys() and all(torch.equal(zero[k], target[k]) for k in target)
    assert min(probs[f"merged_l{x}"]["forget"] for x in (1, 4)) < probs["target"]["forget"]
    again = merge(cfg)
    assert all(r["cached"] for r in again.summary["merged"])
    # A LoRA fine-tune's adapter is the task vector; no second dense model enters the merge.
    lora = merge(cfg.model_copy(update={"merge": cfg.merge.model_copy(update={
        "lambdas": [2.0], "finetune": cfg.merge.finetune.model_copy(update={"lora": True})})}))
    assert lora.task.name == "adapter" and (lora.task / "adapter_config.json").is_file()
    assert lora.summary["probability"]["merged_l2"]["forget"] < lora.summary["probability"]["target"]["forget"]
