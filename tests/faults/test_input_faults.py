"""Fault-injection corpus, inputs: bad data files, checkpoints, MLflow URIs and output directories, each turned into
one clear `error:` line (the problem and the fix) before any expensive work, and no traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import pico_raw


@dataclass
class Result:
    returncode: int
    stderr: str


def _cli(tmp_path: Path, raw: dict, command: str = "prepare", *overrides: str) -> Result:
    """`unlearn COMMAND cfg.yaml OVERRIDES` run in this process from `tmp_path` (the entry point's own `main`: an
    exception it lets out fails the test, as a traceback would fail a user)."""
    from unlearning.cli import main

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(err):
            code = main([command, str(tmp_path / "cfg.yaml"), *overrides])
    finally:
        os.chdir(cwd)
    return Result(code, err.getvalue())


def _refused(res: Result, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors, res.stderr[-2000:]
    for needle in needles:
        assert any(needle in line for line in errors), (needle, errors)


def _files(tmp_path: Path, forget: str, suffix: str = "jsonl") -> dict:
    rows = [{"question": f"Where does R{i} live?", "answer": f"In town {i}."} for i in range(8)]
    (tmp_path / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / f"forget.{suffix}").write_text(forget)
    raw = pico_raw(tmp_path / "run")
    raw["data"] = {"source": "files", "splits": {"forget": f"forget.{suffix}", "retain": "retain.jsonl"}}
    return raw


FORGET = [{"question": f"Where was F{i} born?", "answer": f"In city {i}."} for i in range(6)]


@pytest.mark.parametrize("answer", [None, "", "   "])
def test_an_empty_answer_names_its_row(tmp_path, answer):
    rows = [dict(r) for r in FORGET]
    rows[2]["answer"] = answer
    _refused(_cli(tmp_path, _files(tmp_path, "\n".join(json.dumps(r) for r in rows))),
             "split 'forget' row 3: the answer ('answer') is empty or missing")


def test_a_row_or_a_file_without_an_answer_is_named(tmp_path):
    rows = [dict(r) for r in FORGET]
    del rows[0]["answer"]
    _refused(_cli(tmp_path, _files(tmp_path, "\n".join(json.dumps(r) for r in rows))),
             "split 'forget' row 1: the answer ('answer') is empty or missing")
    only_questions = "\n".join(json.dumps({"question": r["question"]}) for r in FORGET)
    _refused(_cli(tmp_path, _files(tmp_path, only_questions)),
             "split 'forget' has no column 'answer'", "map it with data.columns.answer=<column>")


def test_a_nan_answer_in_a_csv_names_its_row(tmp_path):
    lines = ["question,answer", *(f"{r['question']},{r['answer']}" for r in FORGET)]
    lines[3] = "Where was F2 born?,"
    _refused(_cli(tmp_path, _files(tmp_path, "\n".join(lines), "csv")), "row 3: the answer")


def test_a_broken_json_line_is_named_by_its_number(tmp_path):
    lines = [json.dumps(r) for r in FORGET]
    lines[3] = lines[3][:-1]
    _refused(_cli(tmp_path, _files(tmp_path, "\n".join(lines))), "line 4 is not valid JSON")


def test_a_text_file_named_parquet_is_refused_with_the_fix(tmp_path):
    _refused(_cli(tmp_path, _files(tmp_path, "question,answer\nq,a\n", "parquet")), "is not a Parquet file")


def test_answers_that_are_not_text_are_refused(tmp_path):
    rows = [dict(r) for r in FORGET]
    rows[1]["answer"], rows[2]["answer"] = [1, 2], True
    _refused(_cli(tmp_path, _files(tmp_path, "\n".join(json.dumps(r) for r in rows))),
             "row 2: the answer ('answer') is list", "row 3: the answer ('answer') is bool")


def test_duplicate_rows_are_named_in_a_warning(tmp_path):
    rows = [*FORGET, FORGET[0]]
    res = _cli(tmp_path, _files(tmp_path, "\n".join(json.dumps(r) for r in rows)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: split 'forget': 1 QA pair(s) repeat an earlier row (first: row 7 repeats row 1)" in res.stderr


def test_a_very_long_answer_is_warned_about_once_with_the_fix(tmp_path):
    rows = [dict(r) for r in FORGET]
    rows[4]["answer"] = "It is a long story. " * 5000  # 100k characters
    res = _cli(tmp_path, _files(tmp_path, "\n".join(json.dumps(r) for r in rows)))
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [line for line in res.stderr.splitlines() if "are cut at data.max_length" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 of 14 answers are cut at data.max_length=128")
    assert "Raise data.max_length to keep them whole" in warnings[0]


def test_an_empty_methods_list_and_an_infinite_lr_are_refused(tmp_path):
    raw = pico_raw(tmp_path / "run")
    raw["methods"] = []
    _refused(_cli(tmp_path, raw, "validate"), "methods is an empty list")
    _refused(_cli(tmp_path, pico_raw(tmp_path / "run"), "validate", "train.lr=.inf"), "train.lr")


@pytest.mark.parametrize("uri, needle", [
    ("file:///tmp/mlruns", "is a file store"),
    ("./mlruns", "is a file store"),
    ("", "tracking.uri"),
    ("http://127.0.0.1:9", "no MLflow server answers there"),
])
def test_mlflow_uris_that_cannot_work_are_refused_in_seconds(tmp_path, uri, needle):
    raw = pico_raw(tmp_path / "run")
    raw["tracking"] = {"uri": uri}
    _refused(_cli(tmp_path, raw, "run"), needle)
    assert not (tmp_path / "run").exists()  # no stage ran


def test_a_sqlite_uri_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    raw = pico_raw(tmp_path / "run")
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"}
    _refused(_cli(tmp_path, raw, "run"), "which is a file, not a directory")


def test_an_unwritable_output_directory_is_refused_before_any_stage(tmp_path, monkeypatch):
    """The permission itself is what the check reads (`os.access`); it is denied for one directory, because as root
    (the CI's user) a chmod would not stop a write."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    _refused(_cli(tmp_path, pico_raw(locked / "run"), "prepare"), "where it would be created, is not writable")
    assert not (locked / "run").exists()


def test_a_finished_output_directory_made_read_only_is_refused_and_points_at_its_report(tmp_path, monkeypatch):
    """FAIL 9's cached case: every run writes (the report, the resolved config), so a read-only one is refused
    before any stage, by `run` as by the others, naming the report that is still there to read."""
    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.md").write_text("# the last report")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and real_access(path, mode))
    raw = pico_raw(out)
    raw["tracking"] = {"uri": "none"}
    for command in ("run", "eval"):
        _refused(_cli(tmp_path, raw, command), "the output directory is not writable by this user",
                 f"its last report is readable as it is: {out / 'report' / 'report.md'}")
    assert sorted(p.name for p in out.iterdir()) == ["report"]  # nothing written, nothing lost


def test_an_output_directory_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused(_cli(tmp_path, pico_raw(tmp_path / "afile" / "run"), "prepare"), "which is a file, not a directory")


def _saved_tiny(path: Path) -> Path:
    """A 1-layer Llama checkpoint with a word-level tokenizer of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", "<pad>", *"abcdefgh"])},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def test_another_architectures_config_over_llama_weights_is_refused(tmp_path):
    from transformers import GPT2Config

    from unlearning.errors import UserError
    from unlearning.models import load_causal_lm

    path = _saved_tiny(tmp_path / "ckpt")
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(path)
    with pytest.raises(UserError, match=r"its weights do not fit its config.json \(GPT2LMHeadModel\): missing"):
        load_causal_lm(path)


def test_a_truncated_or_pickled_target_is_refused_before_anything_is_built(tmp_path):
    path = _saved_tiny(tmp_path / "cut")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    raw = pico_raw(tmp_path / "run", model={"target": str(path)})
    _refused(_cli(tmp_path, raw, "unlearn"), "is cut short")
    assert not (tmp_path / "run" / "models").exists()  # the oracle was not fine-tuned first
    weights.unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    _refused(_cli(tmp_path, raw, "unlearn"), "pickled weights are refused", "save_pretrained")


def test_a_hub_name_offline_says_the_hub_is_offline(tmp_path):
    raw = pico_raw(tmp_path / "run", model={"base": "gpt2-not-cached-anywhere"})
    res = _cli(tmp_path, raw, "unlearn")
    _refused(res, "the hub is offline (HF_HUB_OFFLINE is set)")
