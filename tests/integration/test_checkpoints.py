"""A GGUF file as a model source: converted once to a safetensors checkpoint, by content, with its tokenizer."""

import shutil

import pytest
import torch

from unlearning.checkpoints import checkpoint_dir, gguf_file
from unlearning.errors import UserError


def test_model_sources_that_are_not_gguf_pass_through(tmp_path):
    assert checkpoint_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"")
    assert gguf_file(tmp_path) is None  # an HF checkpoint directory wins over a stray file beside it


def test_bad_gguf_sources_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"no GGUF file at .*make models"):
        checkpoint_dir(tmp_path / "missing.gguf")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds 2 GGUF files .*name the one to use"):
        checkpoint_dir(tmp_path)
    (tmp_path / "b.gguf").unlink()
    with pytest.raises(UserError, match="could not load a causal LM from the GGUF file"):
        checkpoint_dir(tmp_path)  # the one file found is empty


def test_gguf_converts_once_by_content_to_the_same_model(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = checkpoint_dir(smollm2)
    copy = tmp_path / "renamed" / smollm2.name
    copy.parent.mkdir()
    shutil.copy(smollm2, copy)
    assert checkpoint_dir(copy.parent) == out  # the same bytes under another path: no second conversion

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    direct = AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name,
                                                  dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = converted(ids).logits, direct(ids).logits
    assert torch.equal(a, b)  # dequantised once, saved in float32: bit for bit what transformers reads
    assert tok.decode(a[0, -1].argmax()) == " Paris"
