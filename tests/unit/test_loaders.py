"""Loaders on local JSONL / CSV / Parquet files and on a local dataset laid out like a hub repo."""

import json
from pathlib import Path

import pandas as pd
import pytest

from unlearning.config import validate_config
from unlearning.data.loaders import load_records
from unlearning.errors import UserError

ROWS = {
    "forget": [{"q": f"Who is F{i}?", "a": f"F{i} is a poet.", "wrong": json.dumps([f"x{i}", f"y{i}", f"z{i}"])}
               for i in range(3)],
    "retain": [{"q": f"Who is R{i}?", "a": f"R{i} is a baker.", "wrong": json.dumps(["p", "q", "r"])}
               for i in range(5)],
}
MAPPING = {"question": "q", "answer": "a", "perturbed_answer": "wrong"}


def write(df: pd.DataFrame, path: Path) -> None:
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[path.suffix]()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_user_files_with_column_mapping(tmp_path, suffix):
    splits = {}
    for name, rows in ROWS.items():
        write(pd.DataFrame(rows), tmp_path / f"{name}{suffix}")
        splits[name] = str(tmp_path / f"{name}{suffix}")
    cfg = validate_config({"name": "f", "data": {"source": "files", "splits": splits, "columns": MAPPING}})
    records = load_records(cfg)
    assert [len(records[s]) for s in ("forget", "retain")] == [3, 5]
    first = records["forget"][0]
    assert first["question"] == "Who is F0?" and first["answer"] == "F0 is a poet."
    assert first["perturbed_answer"] == ["x0", "y0", "z0"]


def tofu_like_repo(root: Path) -> Path:
    """A local directory laid out as a hub dataset repo: one parquet per config + README configs."""
    rows = {"forget10": ROWS["forget"], "retain90": ROWS["retain"]}
    card = ["---", "configs:"]
    for config, data in rows.items():
        (root / config).mkdir(parents=True)
        pd.DataFrame([{"question": r["q"], "answer": r["a"], "paraphrased_answer": r["a"].upper(),
                       "perturbed_answer": json.loads(r["wrong"])} for r in data]).to_parquet(
            root / config / "train-00000.parquet")
        card += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {config}/*.parquet"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def test_hf_source_loads_named_configs_with_the_hub_code_path(tmp_path):
    repo = tofu_like_repo(tmp_path / "tofu")
    cfg = validate_config({"name": "h", "data": {"source": "hf", "path": str(repo),
                                                 "splits": {"forget": "forget10", "retain": "retain90:train"}}})
    records = load_records(cfg)
    assert len(records["forget"]) == 3 and len(records["retain"]) == 5
    assert records["forget"][1]["perturbed_answer"] == ["x1", "y1", "z1"]
    assert records["forget"][1]["paraphrased_answer"] == "F1 IS A POET."


def test_hf_source_unknown_config_is_a_clear_error(tmp_path):
    repo = tofu_like_repo(tmp_path / "tofu")
    cfg = validate_config({"name": "h", "data": {"source": "hf", "path": str(repo),
                                                 "splits": {"forget": "forget05", "retain": "retain90"}}})
    with pytest.raises(UserError, match="could not load config 'forget05'"):
        load_records(cfg)


def test_missing_files_are_all_reported_before_loading(tmp_path):
    cfg = validate_config({"name": "f", "data": {"source": "files", "splits": {
        "forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.csv")}}})
    with pytest.raises(UserError) as info:
        load_records(cfg)
    assert len(info.value.problems) == 2 and "not found" in info.value.problems[0]


def test_missing_column_names_the_mapping_fix(tmp_path):
    write(pd.DataFrame(ROWS["forget"]), tmp_path / "f.jsonl")
    write(pd.DataFrame(ROWS["retain"]), tmp_path / "r.jsonl")
    cfg = validate_config({"name": "f", "data": {"source": "files", "splits": {
        "forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl")}}})
    with pytest.raises(UserError, match=r"no column 'question'.*data.columns.question=<column>"):
        load_records(cfg)


def test_forget_retain_overlap_and_empty_forget_are_rejected(tmp_path):
    write(pd.DataFrame(ROWS["forget"]), tmp_path / "f.jsonl")
    write(pd.DataFrame(ROWS["retain"] + ROWS["forget"][:1]), tmp_path / "r.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    base = {"source": "files", "columns": MAPPING}
    cfg = validate_config({"name": "f", "data": {**base, "splits": {
        "forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl")}}})
    with pytest.raises(UserError, match="1 QA pairs are in both forget and retain"):
        load_records(cfg)
    write(pd.DataFrame(ROWS["forget"][:0], columns=["q", "a", "wrong"]), tmp_path / "e.parquet")
    cfg = validate_config({"name": "f", "data": {**base, "splits": {
        "forget": str(tmp_path / "e.parquet"), "retain": str(tmp_path / "r.jsonl")}}})
    with pytest.raises(UserError, match=r"data.splits.forget: file .*e.parquet' has no rows"):
        load_records(cfg)
    cfg = validate_config({"name": "f", "data": {**base, "splits": {
        "forget": str(tmp_path / "empty.jsonl"), "retain": str(tmp_path / "r.jsonl")}}})
    with pytest.raises(UserError, match=r"data.splits.forget: file .*empty.jsonl' has no rows"):
        load_records(cfg)
