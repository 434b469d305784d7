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


def test_the_synthetic_source_takes_extra_evaluation_splits_such_as_tofus_real_sets(tmp_path):
    """TOFU's real_authors / world_facts files ship in the package (with their licence) and load beside the
    generated splits; they have perturbed but no paraphrased answers."""
    cfg = validate_config({"name": "s", "data": {"synthetic": {"num_entities": 12, "facts_per_entity": 2},
                                                 "forget_fraction": 0.25, "holdout_fraction": 0.25, "splits": {
                                                     "real_authors": "builtin:tofu/real_authors",
                                                     "real_world": "builtin:tofu/world_facts"}}})
    records = load_records(cfg)
    assert {"forget", "retain", "holdout", "world_facts", "real_authors", "real_world"} == set(records)
    assert len(records["real_authors"]) == 100 and len(records["real_world"]) == 117
    first = records["real_authors"][0]
    assert first["answer"] == "William Shakespeare" and len(first["perturbed_answer"]) == 3
    assert "paraphrased_answer" not in first
    with pytest.raises(UserError, match="unknown packaged set 'builtin:tofu/nope'; available: builtin:tofu/real_"):
        load_records(validate_config({"name": "s", "data": {"splits": {"x": "builtin:tofu/nope"}}}))


def test_a_mapped_column_a_split_lacks_is_an_error_and_mappings_can_be_per_split(tmp_path):
    forget = [{**r, "para": r["a"]} for r in ROWS["forget"]]
    write(pd.DataFrame(forget), tmp_path / "f.jsonl")
    write(pd.DataFrame(ROWS["retain"]), tmp_path / "r.jsonl")
    splits = {"forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl")}
    shared = {**MAPPING, "paraphrased_answer": "para"}
    cfg = validate_config({"name": "f", "data": {"source": "files", "splits": splits, "columns": shared}})
    with pytest.raises(UserError, match=r"data.columns maps paraphrased_answer to 'para', which split 'retain' "
                                        r"lacks .*data.columns.<split>.paraphrased_answer=para"):
        load_records(cfg)
    per_split = {**MAPPING, "forget": {"paraphrased_answer": "para"}}
    records = load_records(validate_config({"name": "f", "data": {"source": "files", "splits": splits,
                                                                  "columns": per_split}}))
    assert records["forget"][0]["paraphrased_answer"] == "F0 is a poet."
    assert "paraphrased_answer" not in records["retain"][0]


@pytest.mark.parametrize(("answer", "message"), [
    (None, "row 2: the answer ('a') is empty or missing"), (float("nan"), "row 2: the answer ('a') is empty"),
    ("  ", "row 2: the answer ('a') is empty"), ([1, 2], "row 2: the answer ('a') is list '[1, 2]', not text"),
    (True, "row 2: the answer ('a') is bool 'True', not text")])
def test_empty_or_non_text_cells_name_the_row(tmp_path, answer, message):
    rows = [dict(r) for r in ROWS["forget"]]
    rows[1]["a"] = answer
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write(pd.DataFrame(ROWS["retain"]), tmp_path / "r.jsonl")
    cfg = validate_config({"name": "f", "data": {"source": "files", "columns": MAPPING, "splits": {
        "forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl")}}})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_records(cfg)


def test_numbers_read_by_a_csv_reader_are_kept_as_text(tmp_path):
    write(pd.DataFrame([{"q": f"When did F{i} debut?", "a": 1984 + i} for i in range(3)]), tmp_path / "f.csv")
    write(pd.DataFrame([{"q": f"When did R{i} debut?", "a": 1990 + i} for i in range(3)]), tmp_path / "r.csv")
    cfg = validate_config({"name": "f", "data": {"source": "files", "columns": {"question": "q", "answer": "a"},
                                                 "splits": {"forget": str(tmp_path / "f.csv"),
                                                            "retain": str(tmp_path / "r.csv")}}})
    assert load_records(cfg)["forget"][1]["answer"] == "1985"
