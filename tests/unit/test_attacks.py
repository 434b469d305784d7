"""The attack definitions: how each prompt attack rewrites a forget row, the person halves relearning splits,
and quantization that must change nothing on weights already on its grid (and something off it)."""

from __future__ import annotations

import pytest
import torch

from unlearning.evaluate.attacks import PROMPTS, encoded, entity_halves
from unlearning.schema import Template

ROWS = [
    {"entity": "Mara Voss", "question": "Where was Mara Voss born?", "answer": "Drulzeath.",
     "paraphrased_question": "In which city was Mara Voss born?", "paraphrased_answer": "It is Drulzeath.",
     "perturbed_answer": ["It is Kelbrin.", "It is Stoumar.", "It is Vaithor."],
     "cloze": "Mara Voss was born in ___.", "cloze_answer": "Drulzeath",
     "cloze_wrong": ["Kelbrin", "Stoumar", "Vaithor"]},
    {"entity": "Mara Voss", "question": "What genre does Mara Voss write?", "answer": "Poetry.",
     "perturbed_answer": ["It is crime.", "It is horror.", "It is romance."], "paraphrased_answer": "It is poetry."},
    {"entity": "Teo Brun", "question": "Which instrument does Teo Brun play?", "answer": "Cello.",
     "perturbed_answer": ["It is harp.", "It is oboe.", "It is banjo."], "paraphrased_answer": "It is cello."},
]
TEMPLATE = Template()


def _attack(name, rows=ROWS, **settings):
    return PROMPTS.get(name).fn(rows, TEMPLATE, settings)


def test_choice_lists_the_true_answer_among_the_perturbed_ones_in_one_wording():
    asked = _attack("choice", seed=0)
    assert asked.chance == pytest.approx(0.25)
    for row, orig in zip(asked.rows, ROWS, strict=True):
        assert row["answer"] == orig["paraphrased_answer"]
        assert sorted(row["perturbed_answer"]) == sorted(orig["perturbed_answer"])
        lines = row["question"].splitlines()
        listed = [line.split(". ", 1)[1] for line in lines if line[:2] in ("A.", "B.", "C.", "D.")]
        assert sorted(listed) == sorted([orig["paraphrased_answer"], *orig["perturbed_answer"]])
    positions = {asked_row["question"].splitlines().index(next(
        line for line in asked_row["question"].splitlines() if line.endswith(asked_row["answer"])))
        for asked_row in _attack("choice", rows=ROWS * 8, seed=1).rows}
    assert len(positions) > 1  # the true option is not always in the same place


def test_cloze_blanks_the_value_and_offers_the_wrong_values():
    asked = _attack("cloze", rows=ROWS[:1])
    (row,) = asked.rows
    assert row["question"] == "Fill in the blank: Mara Voss was born in ___."
    assert row["answer"] == "Drulzeath" and row["perturbed_answer"] == ["Kelbrin", "Stoumar", "Vaithor"]
    assert _attack("cloze").unavailable.startswith("the forget split has no cloze statements")


def test_context_prepends_the_same_persons_other_facts_only():
    rows = _attack("context", facts=2).rows
    assert rows[0]["question"] == "What genre does Mara Voss write? Poetry.\nWhere was Mara Voss born?"
    assert rows[2]["question"] == ROWS[2]["question"]  # Teo Brun has no other fact
    assert [r["question"] for r in _attack("context", facts=0).rows] == [r["question"] for r in ROWS]


def test_prefix_goes_in_the_prompt_and_is_never_scored():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Question", ":", "Where", "was", "Mara", "Voss", "born", "?", "Answer", "Sure", ",", "the", "answer", "is",
             "Drulzeath", ".", "</s>", "<pad>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    asked = _attack("prefix", rows=ROWS[:1], prefix="Sure, the answer is")
    (plain,), (attacked,) = encoded(_attack("context", rows=ROWS[:1]), tok, 64), encoded(asked, tok, 64)
    scored = [t for t in attacked["labels"] if t != -100]
    assert scored == [t for t in plain["labels"] if t != -100]  # the same answer tokens are scored
    assert tok.decode(attacked["input_ids"][: len(attacked["input_ids"]) - len(scored)]).endswith(
        "Sure , the answer is")


def test_entity_halves_split_by_person_and_cover_the_split():
    rows = [{"entity": f"p{i // 3}"} for i in range(12)]
    trained, held = entity_halves(rows, seed=0)
    assert sorted(trained + held) == list(range(12))
    assert not {rows[i]["entity"] for i in trained} & {rows[i]["entity"] for i in held}
    assert len(trained) == len(held) == 6
    assert entity_halves(rows, seed=0) == (trained, held)


def _tiny_model(tmp_path, on_grid: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    if on_grid:
        import bitsandbytes.functional as bnbf

        for module in model.model.modules():
            if isinstance(module, torch.nn.Linear):  # quantize once: the dequantized weights lie on the NF4 grid
                q, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(q, state, blocksize=64, quant_type="nf4")
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("on_grid", [True, False])
def test_nf4_leaves_weights_on_its_grid_unchanged_and_changes_others(tmp_path, on_grid):
    from unlearning.evaluate.attacks import quantization_config
    from unlearning.models import load_causal_lm

    path = _tiny_model(tmp_path, on_grid)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        plain = load_causal_lm(path)(x).logits
        quantized = load_causal_lm(path, quantization=quantization_config("nf4", torch.float32))(x).logits
    if on_grid:
        assert torch.equal(plain, quantized)
    else:
        assert (plain - quantized).abs().max() > 1e-3
