import pytest
import torch

from unlearning.data.tokenize import collate, encode_qa, train_tokenizer
from unlearning.errors import UserError
from unlearning.methods.logprobs import IGNORE_INDEX, sequence_logprobs
from unlearning.schema import Template

TEXTS = ["Question: Where was Ada Vorn born?\nAnswer: Drulzeath.", "It is Drulzeath.", "Kelmar writes poetry."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_trained_tokenizer_has_special_tokens_and_adds_bos(tok):
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("Drulzeath.", add_special_tokens=False)["input_ids"]) == "Drulzeath."


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(tok):
    tpl = Template()
    enc = encode_qa(tok, tpl, "Where was Ada Vorn born?", "Drulzeath.", max_length=64)
    prompt_len = len(tok(tpl.prompt.format(question="Where was Ada Vorn born?"))["input_ids"])
    assert enc["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert enc["labels"][prompt_len:] == enc["input_ids"][prompt_len:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    answer = tok.decode(enc["input_ids"][prompt_len:-1])
    assert answer == " Drulzeath."
    assert len(enc["attention_mask"]) == len(enc["input_ids"])


def test_truncation_keeps_labels_aligned(tok):
    enc = encode_qa(tok, Template(), "Where was Ada Vorn born?", "Drulzeath. " * 20, max_length=30)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 30


def test_chat_template_needs_one(tok):
    with pytest.raises(UserError, match="no chat template"):
        encode_qa(tok, Template(chat=True), "q?", "a", max_length=32)


def test_collate_pads_and_masks_padding_in_labels(tok):
    a = encode_qa(tok, Template(), "Where was Ada Vorn born?", "Drulzeath.", 64)
    b = encode_qa(tok, Template(), "Who?", "Kelmar writes poetry and more poetry.", 64)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(a["input_ids"]) < width else 1
    n = len((a, b)[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()


def test_sequence_logprob_counts_only_answer_tokens(tok):
    """Uniform logits over V: the answer's log-prob is −|y|·log V whatever the prompt length."""
    a = encode_qa(tok, Template(), "Where was Ada Vorn born?", "Drulzeath.", 64)
    b = encode_qa(tok, Template(), "Who is it, then, really?", "Drulzeath.", 64)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    logits = torch.zeros(*batch["input_ids"].shape, len(tok))
    s = sequence_logprobs(logits, batch["labels"])
    n_answer = sum(label != IGNORE_INDEX for label in a["labels"])
    assert s.ntokens.tolist() == [n_answer, n_answer]
    assert s.logp[0].item() == pytest.approx(-n_answer * torch.log(torch.tensor(float(len(tok)))).item())


def test_chat_template_prompt_is_masked(tok):
    tok.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant]{% endif %}"
    try:
        enc = encode_qa(tok, Template(chat=True), "Where was Ada Vorn born?", "Drulzeath.", max_length=64)
    finally:
        tok.chat_template = None
    n_prompt = enc["labels"].count(IGNORE_INDEX)
    assert tok.decode(enc["input_ids"][:n_prompt]).endswith("[assistant]")
    assert tok.decode(enc["input_ids"][n_prompt:-1]) == "Drulzeath."  # the assistant turn starts the answer


def test_chat_is_the_default_when_the_tokenizer_has_a_template(tok):
    """A chat model's tokenizer brings its template: unset `chat` uses it, with the answer right after the
    assistant turn; a tokenizer without one (the trained default) gets the plain prompt and ' {answer}'."""
    plain = encode_qa(tok, Template(), "Where was Ada Vorn born?", "Drulzeath.", max_length=64)
    assert tok.decode(plain["input_ids"]).startswith("<s>Question: Where was Ada Vorn born?\nAnswer: Drulzeath.")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant]{% endif %}"
    try:
        auto = encode_qa(tok, Template(), "Where was Ada Vorn born?", "Drulzeath.", max_length=64)
        off = encode_qa(tok, Template(chat=False), "Where was Ada Vorn born?", "Drulzeath.", max_length=64)
    finally:
        tok.chat_template = None
    n_prompt = auto["labels"].count(IGNORE_INDEX)
    assert tok.decode(auto["input_ids"][:n_prompt]).endswith("[user] Where was Ada Vorn born?\n[assistant]")
    assert tok.decode(auto["input_ids"][n_prompt:-1]) == "Drulzeath."
    assert off == plain


def test_a_prompt_that_leaves_no_answer_token_is_an_error_not_a_probability_of_one(tok):
    """Cut to the limit, the answer would have no token: its length-normalised probability exp(0/0) = 1."""
    with pytest.raises(UserError, match=r"leaving no answer token to score; raise data.max_length"):
        encode_qa(tok, Template(), "Where was Ada Vorn born? " * 4, "Drulzeath.", max_length=12)
