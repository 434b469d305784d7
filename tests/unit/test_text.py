"""Text corpora: documents chunked into sequences scored on every token, loaded from files and generated as
passages, and VerbMem on hand-made continuations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unlearning.config import validate_config
from unlearning.data import synthetic
from unlearning.data.loaders import load_records
from unlearning.data.text import chunk_documents, is_text, token_stream
from unlearning.data.tokenize import train_tokenizer
from unlearning.errors import UserError
from unlearning.evaluate import knowledge as k
from unlearning.evaluate import metrics as m
from unlearning.evaluate.probes import SplitProbes
from unlearning.methods.logprobs import IGNORE_INDEX
from unlearning.schema import SyntheticData

DOCS = ["Tan Postealli is an author. Tan Postealli plays the harp.",
        "The capital of Zorn is Drulzeath.",
        "A third document, long enough to run over the end of one chunk and into the next one."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS * 20, 300)


@pytest.mark.parametrize("max_length", [8, 13, 64])
def test_chunks_hold_every_token_of_the_stream_once_with_an_eos_after_each_document(tok, max_length):
    """The chunks' labels, concatenated, are the stream of the documents' tokens with EOS after each: no token
    lost or counted twice; each chunk is the tokenizer's BOS (unscored) and at most max_length − 1 stream tokens,
    every one of them a label; only the last chunk is short."""
    stream = token_stream(tok, DOCS)
    assert stream.count(tok.eos_token_id) == len(DOCS) and stream[-1] == tok.eos_token_id
    rows = chunk_documents(tok, DOCS, max_length)
    labels = [t for r in rows for t in r["labels"] if t != IGNORE_INDEX]
    assert labels == stream
    for r in rows:
        assert r["input_ids"][0] == tok.bos_token_id and r["labels"][0] == IGNORE_INDEX
        assert r["input_ids"][1:] == r["labels"][1:] and len(r["input_ids"]) <= max_length
        assert r["attention_mask"] == [1] * len(r["input_ids"]) and r["answer"] == r["text"] and r["question"] == ""
    assert all(len(r["input_ids"]) == max_length for r in rows[:-1])
    assert is_text(rows) and not is_text([{"question": "q?", "answer": "a"}])
    with pytest.raises(ValueError, match="no room"):
        chunk_documents(tok, DOCS, 2)


def test_a_chunk_decodes_to_its_documents_text(tok):
    rows = chunk_documents(tok, DOCS[:1], 64)
    assert len(rows) == 1 and rows[0]["text"] == DOCS[0]


def test_verbmem_is_the_rouge_l_f1_of_each_continuation_skipping_chunks_with_nothing_to_continue():
    """'the cat sat' against 'the cat sat on the mat': LCS 3, precision 3/3, recall 3/6, F1 2/3; an exact
    continuation scores 1; a reference that is empty (the chunk ended within the prefix) is left out: mean 5/6."""
    continuations, references = ["the cat sat", "a b c", "x"], ["the cat sat on the mat", "a b c", " "]
    values = k.verbatim_memorization(continuations, references)
    assert values[:2] == pytest.approx([2 / 3, 1.0]) and np.isnan(values[2])
    probes = {"forget": SplitProbes(answer=None, answers=["", "", ""], generation=[],  # type: ignore[arg-type]
                                    continuations=continuations, references=references)}
    out = k.verbmem(m.EvalInputs(probes))
    assert out["forget_verbmem"].value == pytest.approx(5 / 6)
    assert out["forget_verbmem"].per_example[2] is None


def test_a_split_of_documents_loads_from_a_text_column_beside_qa_splits(tmp_path):
    """forget and retain as JSONL documents (`text` mapped from `body` for those splits), forget_qa as QA pairs; a
    document without its text is an error naming the row."""
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "Retained prose."}) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Who?", "answer": "Tan."}) + "\n")
    raw = {"name": "t", "data": {"source": "files", "columns": {"forget": {"text": "body"}, "retain": {"text": "body"}},
                                 "splits": {"forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl"),
                                            "forget_qa": str(tmp_path / "q.jsonl")}}}
    records = load_records(validate_config(raw))
    assert records["forget"][1] == {"text": DOCS[1]} and records["retain"] == [{"text": "Retained prose."}]
    assert records["forget_qa"] == [{"question": "Who?", "answer": "Tan."}]
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": " ", "id": 0}) + "\n")
    with pytest.raises(UserError, match="the text \\('body'\\) is empty"):
        load_records(validate_config(raw))


def test_the_generator_writes_each_persons_facts_as_a_passage_and_keeps_their_qa():
    """format=text: one passage per person stating every fact's value; the same people's QA pairs in *_qa."""
    cfg = SyntheticData(num_entities=10, facts_per_entity=4, format="text")
    splits = synthetic.generate(cfg, 0.2, 0.2, seed=3)
    assert [len(splits[s]) for s in ("forget", "holdout", "retain")] == [2, 2, 6]
    assert [len(splits[f"{s}_qa"]) for s in ("forget", "holdout", "retain")] == [8, 8, 24]
    for doc in splits["forget"]:
        facts = [r for r in splits["forget_qa"] if r["entity"] == doc["entity"]]
        assert doc["text"].startswith(f"{doc['entity']} is an author.") and len(facts) == 4
        assert all(r["cloze_answer"] in doc["text"] for r in facts)
    qa = synthetic.generate(SyntheticData(num_entities=10, facts_per_entity=4), 0.2, 0.2, seed=3)
    assert qa["forget"] == splits["forget_qa"]  # the QA data of a seed is the same in either format



def test_a_document_in_both_forget_and_retain_is_refused_and_a_repeated_one_warned_about(tmp_path, capsys):
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in [*DOCS, DOCS[0]]))
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": DOCS[1].upper()}) + "\n")
    raw = {"name": "t", "data": {"source": "files", "splits": {"forget": str(tmp_path / "f.jsonl"),
                                                               "retain": str(tmp_path / "r.jsonl")}}}
    with pytest.raises(UserError, match="1 documents are in both forget and retain"):
        load_records(validate_config(raw))
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "Another text."}) + "\n")
    load_records(validate_config(raw))
    assert "split 'forget': 1 document(s) repeat an earlier row (first: row 4 repeats row 1)" in capsys.readouterr().err


def test_what_needs_questions_is_refused_on_a_text_forget_split_before_any_model_is_built(pico):
    """IdkDPO and AltPO pair forget questions with other answers, ICUL puts forget items with other answers before
    each question, the attack stage asks the forget questions in other forms: with a text forget split each is a
    problem found by preflight, with the reason; GradDiff and RMU are fine."""
    from unlearning.stages import preflight
    from unlearning.stages import prepare as prepare_stage

    text = {"synthetic": {"num_entities": 12, "facts_per_entity": 4, "num_utility": 6, "format": "text"}}
    cfg = pico(data=text, methods=[{"name": "idkdpo"}, {"name": "altpo"}, {"name": "icul", "n": 2},
                                   {"name": "graddiff"}, {"name": "rmu", "layer": "model.layers.1"}],
               attack={"attacks": ["prefix"]})
    problems = preflight(cfg, prepare_stage(cfg))
    assert sum("the forget split is text, which has no questions; use a method" in p for p in problems) == 2
    assert any(p.startswith("icul: an in-context method") for p in problems)
    assert any("the attack stage asks the forget set's questions" in p for p in problems)
    assert not any(p.startswith(("graddiff", "rmu")) for p in problems)
