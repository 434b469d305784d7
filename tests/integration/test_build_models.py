"""The build stage on a pico model: real fine-tuning, safetensors checkpoints, caching, no overwrite."""

import json
import os

import pytest
import torch

from unlearning.data.prepare import prepare
from unlearning.errors import UserError
from unlearning.models import build_models, load_causal_lm, tiny_llama


def test_prepare_is_cached_by_fingerprint_and_changes_with_inputs(pico):
    first = prepare(pico())
    stamp = (first.path / "fingerprint.json").stat().st_mtime_ns
    again = prepare(pico())
    assert again == first and (first.path / "fingerprint.json").stat().st_mtime_ns == stamp
    other = prepare(pico(seed=1))
    assert other.fingerprint != first.fingerprint and first.path.exists()
    splits = first.splits()
    assert set(splits) == {"forget", "retain", "holdout", "world_facts"}
    assert first.info()["counts"]["forget"] == 12  # 3 people × 4 facts


def test_build_trains_both_models_then_reuses_them(pico):
    cfg = pico(model={"finetune": {"epochs": 25, "batch_size": 8, "lr": 5e-3}})
    built = build_models(cfg)
    for path in (built.target, built.oracle):
        assert (path / "model.safetensors").is_file() and (path / "build.json").is_file()
    assert built.target != built.oracle
    model = load_causal_lm(built.target)
    assert model.config.model_type == "llama"
    info = built.summary["builds"]
    assert info["target"]["splits"] == ["forget", "retain", "world_facts"]
    assert info["oracle"]["splits"] == ["retain", "world_facts"]
    assert not info["target"]["cached"] and not info["oracle"]["cached"]
    # The target saw the forget facts, the oracle did not.
    probs = built.summary["probability"]
    assert probs["target"]["forget"] > probs["oracle"]["forget"] + 0.1
    assert probs["target"]["forget"] > probs["target"]["holdout"]

    stamp = (built.target / "model.safetensors").stat().st_mtime_ns
    again = build_models(cfg)
    assert again.summary["builds"]["target"]["cached"] and again.summary["builds"]["oracle"]["cached"]
    assert (built.target / "model.safetensors").stat().st_mtime_ns == stamp

    changed = build_models(cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "finetune": cfg.model.finetune.model_copy(update={"epochs": 1})})}))
    assert changed.target != built.target and built.target.exists()  # earlier model kept


def test_same_seed_same_target_weights(pico, tmp_path):
    a = build_models(pico(output_dir=str(tmp_path / "a")))
    b = build_models(pico(output_dir=str(tmp_path / "b")))
    wa, wb = load_causal_lm(a.target).state_dict(), load_causal_lm(b.target).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_checkpoints_are_used_and_vocab_mismatch_fails_before_training(pico, tmp_path):
    cfg = pico()
    tokenizer = prepare(cfg).tokenizer()
    small = tiny_llama(cfg, tokenizer)
    small.resize_token_embeddings(len(tokenizer) - 10)
    small.save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    bad = pico(model={"target": str(tmp_path / "small")})
    with pytest.raises(UserError, match=r"model.target: the tokenizer has \d+ tokens but .* embeds only"):
        build_models(bad)
    assert not (cfg.out / "models").exists()  # nothing trained

    good = tiny_llama(cfg, tokenizer)
    good.save_pretrained(tmp_path / "good")
    tokenizer.save_pretrained(tmp_path / "good")
    built = build_models(pico(model={"target": str(tmp_path / "good")}))
    assert built.target == tmp_path / "good" and "target" not in built.summary["builds"]
    assert json.loads((cfg.out / "models" / "summary.json").read_text())["target"] == str(tmp_path / "good")


def test_missing_checkpoint_is_reported(pico, tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError) as info:
        build_models(pico(model={"target": str(tmp_path / "nope"), "oracle": str(tmp_path / "empty")}))
    text = str(info.value)
    assert "model.target: no model config" in text and "model.oracle" in text


def test_base_model_from_pretrained_is_fine_tuned_with_its_own_tokenizer(pico, tmp_path):
    """model.base given as a checkpoint path: its tokenizer is used and both roles start from it."""
    cfg = pico()
    tokenizer = prepare(cfg).tokenizer()
    base = tiny_llama(cfg, tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    built = build_models(pico(model={"base": str(tmp_path / "base")}))
    from_base = prepare(pico(model={"base": str(tmp_path / "base")}))
    assert from_base.info()["tokenizer"][0] == "pretrained"
    start = base.state_dict()
    tuned = load_causal_lm(built.target).state_dict()
    assert set(tuned) == set(start)
    assert any(not torch.equal(tuned[k], start[k]) for k in start)


def test_prompts_that_leave_no_room_for_the_answer_fail_and_cut_answers_warn(pico, capsys):
    """Paraphrased questions are prompts too: each is checked. An answer cut at max_length loses its EOS: a
    warning with the count, recorded in fingerprint.json."""
    with pytest.raises(UserError, match=r"prompts are at least data.max_length=12 tokens long, leaving no room for "
                                        r"the answer .*raise data.max_length above"):
        prepare(pico(data={"max_length": 12}))
    prepared = prepare(pico(data={"max_length": 42, "synthetic": {"num_entities": 12, "facts_per_entity": 4,
                                                                   "answer_style": "sentence", "num_utility": 6}}))
    assert prepared.info()["truncated_answers"] > 0
    assert "answers are cut at data.max_length=42 tokens and lose their EOS" in capsys.readouterr().err
