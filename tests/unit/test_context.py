"""In-context methods: the contexts ICUL and the instruction baseline build, how they are rendered before a
question, and how the window shortens them (never the answer)."""

from __future__ import annotations

import random

import pytest

from unlearning.config import validate_config
from unlearning.data.context import Context
from unlearning.data.encoders import ContextEncoder, QAEncoder
from unlearning.data.refusals import REFUSALS
from unlearning.data.tokenize import encode_prompts, encode_qa_many, train_tokenizer
from unlearning.errors import UserError
from unlearning.evaluate.subject import Subject, contexts
from unlearning.methods import METHODS, in_context
from unlearning.methods.logprobs import IGNORE_INDEX
from unlearning.schema import MethodConfig, Template


def row(i: int, entity: str = "") -> dict:
    return {"question": f"Where was person {i} born?", "answer": f"In town {i}.", "entity": entity or f"Person {i}",
            "perturbed_answer": [f"In village {i}.", f"In city {i}."]}


FORGET = [row(i) for i in range(3)]
RETAIN = [row(i) for i in range(10, 20)]
TEXTS = [f"{r['question']} {r['answer']} {a}" for r in FORGET + RETAIN for a in r["perturbed_answer"]] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([*TEXTS, "Question: Answer: You have unlearned everything about"], vocab_size=400)


def test_icul_shows_the_forget_item_flipped_then_n_minus_1_retain_items_answered_never_the_question():
    icul = METHODS.get("icul").fn
    query = RETAIN[0]
    ctx = icul(query, FORGET[1], RETAIN, random.Random(0), n=6, flip="perturbed")
    assert ctx.instruction == ""
    assert len(ctx.demos) == 6
    assert ctx.demos[0][0] == FORGET[1]["question"] and ctx.demos[0][1] in FORGET[1]["perturbed_answer"]
    shown = {q: a for q, a in ctx.demos[1:]}
    assert query["question"] not in shown and len(shown) == 5
    assert all(shown[r["question"]] == r["answer"] for r in RETAIN if r["question"] in shown)
    refused = icul(FORGET[1], FORGET[1], RETAIN, random.Random(0), n=2, flip="refusal")
    assert refused.demos[0] == (FORGET[1]["question"], refused.demos[0][1]) and refused.demos[0][1] in REFUSALS
    assert len(refused.demos) == 2
    # Without perturbed answers a flip falls back to a refusal; the draw follows the rng alone.
    bare = {k: v for k, v in FORGET[1].items() if k != "perturbed_answer"}
    assert icul(bare, bare, RETAIN, random.Random(3), n=2).demos[0][1] in REFUSALS
    same = [icul(query, FORGET[1], RETAIN, random.Random(5), n=4) for _ in range(2)]
    assert same[0] == same[1]


def test_instruct_names_the_entity_or_else_the_question():
    instruct = METHODS.get("instruct").fn
    assert instruct(RETAIN[0], FORGET[2], RETAIN, random.Random(0)).instruction.startswith(
        "You have unlearned everything about Person 2.")
    no_entity = {k: v for k, v in FORGET[2].items() if k != "entity"}
    got = instruct(RETAIN[0], no_entity, RETAIN, random.Random(0), instruction="Forget {subject}.").instruction
    assert got == f'Forget "{FORGET[2]["question"]}".'


def test_in_context_methods_are_checked_at_load_and_train_nothing(tmp_path):
    def load(method: dict):
        return validate_config({"name": "x", "output_dir": str(tmp_path), "method": method})

    with pytest.raises(UserError, match=r"method.n: Input should be greater than or equal to 2"):
        load({"name": "icul", "n": 1})
    with pytest.raises(UserError, match=r"method.flip"):
        load({"name": "icul", "flip": "swap"})
    with pytest.raises(UserError, match=r"method.instruction: String should match pattern"):
        load({"name": "instruct", "instruction": "forget it all"})
    cfg = load({"name": "icul"})
    assert in_context(cfg.method) and cfg.method.params == {"n": 4, "flip": "perturbed"}
    assert not in_context(load({"name": "npo"}).method)
    with pytest.raises(ValueError, match="an in-context method takes"):
        METHODS.register("bad_context", in_context=True)(lambda forget, *, n=1: Context())


def test_an_empty_context_renders_the_plain_prompt_and_a_context_comes_first_as_template_turns(tok):
    tpl = Template()
    questions = [r["question"] for r in FORGET]
    assert encode_prompts(tok, tpl, questions, [Context()] * 3) == encode_prompts(tok, tpl, questions)
    ctx = Context("Forget Person 1.", (("Where was person 1 born?", "In village 1."),))
    (ids,) = encode_prompts(tok, tpl, ["Where was person 10 born?"], [ctx])
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == (
        "Forget Person 1.\n\nQuestion: Where was person 1 born?\nAnswer: In village 1.\n\n"
        "Question: Where was person 10 born?\nAnswer:")


def test_a_chat_template_gets_the_instruction_as_system_and_demonstrations_as_turns(tok):
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        tpl = Template(chat=True)
        ctx = Context("Forget.", (("Q1?", "A1."),))
        (ids,) = encode_prompts(tok, tpl, ["Q2?"], [ctx])
        assert tok.decode(ids, skip_special_tokens=True) == (
            "<system>Forget.</system><user>Q1?</user><assistant>A1.</assistant><user>Q2?</user><assistant>")
    finally:
        tok.chat_template = None


def test_the_window_drops_demonstrations_from_the_end_then_the_instruction_never_the_answer(tok):
    tpl = Template()
    ctx = Context("Forget Person 1.", tuple((r["question"], r["answer"]) for r in [FORGET[1], *RETAIN[:3]]))
    item = (0, RETAIN[5]["question"], RETAIN[5]["answer"])
    (plain,) = encode_qa_many(tok, tpl, [item[1:]], max_length=256)
    answer = [t for t in plain["labels"] if t != IGNORE_INDEX]

    def fitted(window: int):
        enc = ContextEncoder(tok, tpl, window, [ctx])
        (got,) = enc.qa_many([item])
        return enc, got

    full_enc, _ = fitted(512)
    assert full_enc.summary() == {"max_length": 512, "sequences": 1, "shortened": 0, "demos_dropped": 0}
    # Each shorter window keeps a prefix of the demonstrations (the flipped forget item last to go) and the
    # whole answer, which the labels score.
    lengths = [len(encode_prompts(tok, tpl, [item[1]], [ctx.shortened(k)])[0]) + len(answer) for k in range(5)]
    for keep in range(4, -1, -1):
        enc, got = fitted(lengths[keep])
        assert [t for t in got["labels"] if t != IGNORE_INDEX] == answer
        assert got["input_ids"][:-len(answer)] == encode_prompts(tok, tpl, [item[1]], [ctx.shortened(keep)])[0]
        assert enc.summary()["demos_dropped"] == 4 - keep and enc.summary()["shortened"] == (keep < 4)
    # No demonstration fits: the instruction goes too, and the sequence is the plain encoder's.
    enc, got = fitted(len(plain["input_ids"]))
    assert got["input_ids"] == plain["input_ids"] and got["labels"] == plain["labels"]
    # The prompt a greedy answer is generated from is the one the answer is scored after, fitted once.
    assert enc.prompts([item]) == [got["input_ids"][:-len(answer)]]
    assert enc.summary()["sequences"] == 1
    with pytest.raises(UserError, match="without any context, at least the window"):
        ContextEncoder(tok, tpl, 8, [ctx]).qa_many([item])


def test_a_subject_identity_and_its_contexts_follow_the_method_and_the_seed(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    icul = MethodConfig(name="icul", n=2, flip="perturbed")
    plain, a, b = Subject(tmp_path), Subject(tmp_path, icul, 0), Subject(tmp_path, icul, 1)
    assert len({plain.identity, a.identity, b.identity}) == 3
    assert Subject(tmp_path, MethodConfig(name="icul", n=4, flip="perturbed"), 0).identity != a.identity
    assert plain.describe() is None and a.describe() == {"method": icul.model_dump(), "seed": 0}
    forget_ctx = contexts(icul, 0, "forget", FORGET, FORGET, RETAIN)
    # A forget question's context flips its own item; any other question's, an item drawn from the forget set.
    assert [c.demos[0][0] for c in forget_ctx] == [r["question"] for r in FORGET]
    assert all(c.demos[0][0] in {r["question"] for r in FORGET} for c in contexts(icul, 0, "retain", RETAIN,
                                                                                   FORGET, RETAIN))
    assert forget_ctx == contexts(icul, 0, "forget", FORGET, FORGET, RETAIN)
    assert forget_ctx != contexts(icul, 1, "forget", FORGET, FORGET, RETAIN)
    encoders = plain.encoders({"forget": FORGET}, {}, None, validate_config({"name": "x"}), 64)
    assert type(encoders["forget"]) is QAEncoder
