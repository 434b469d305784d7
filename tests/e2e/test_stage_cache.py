"""One cache key per stage: a changed input of a stage reruns exactly that stage and the stages after it, through
the CLI (`unlearn eval`, the stages' caches on disk) and through the flow (Prefect's cache, keyed by the same
functions), and both layers agree on what ran. The data comes from local JSONL files, so that an edited source
file is one of the changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import pico_raw

LABELS = ("target", "oracle", "ga", "merged_l2")
EVALS = {f"eval:{x}" for x in LABELS}
TRAINED = {"unlearn:ga", "unlearn:finetune", "merge"}
# (what changes, the stages it reruns): each change keeps the ones before it.
CHANGES = [
    (["eval.max_new_tokens=4"], EVALS),
    (["merge.lambdas=[3.0]"], {"merge", "eval:merged_l3"}),
    (["train.lr=2.0e-3"], {"unlearn:ga", "eval:ga"}),  # the merge's fine-tune has its own lr
    (["model.finetune.epochs=3"], {"build", *TRAINED, *(EVALS - {"eval:merged_l2"}), "eval:merged_l3"}),
    ("edit forget.jsonl", {"prepare", "build", *TRAINED, *(EVALS - {"eval:merged_l2"}), "eval:merged_l3"}),
]
# The markers each stage writes last, when it has computed (not reused) its output.
MARKERS = {"data": "fingerprint.json", "models": "build.json", "unlearn": "run_summary.json",
           "merge": "model/merge.json", "eval": "eval.json"}


def _sources(tmp_path: Path) -> dict[str, str]:
    """forget/retain/holdout JSONL files of invented people (the built-in generator's, written out)."""
    from unlearning.data import synthetic
    from unlearning.schema import SyntheticData

    splits = synthetic.generate(SyntheticData(num_entities=12, facts_per_entity=4, num_utility=0), 0.25, 0.25, 0)
    files = {}
    for split in ("forget", "retain", "holdout"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in splits[split]))
        files[split] = str(path)
    return files


def _raw(tmp_path: Path, out: str) -> dict:
    raw = pico_raw(tmp_path / out, methods=[{"name": "ga"}], train={"num_processes": 1, "batch_size": 2,
                                                                   "max_steps": 2, "lr": 1e-3},
                   merge={"lambdas": [2.0], "finetune": {"lr": 3e-3, "max_steps": 2}},
                   eval={"suite": "quick"}, tracking={"uri": "none"})
    raw["data"] = {"source": "files", "splits": _sources(tmp_path), "max_length": 48, "tokenizer": {"vocab_size": 400}}
    return raw


def _written(out: Path) -> dict[str, int]:
    """Stage output marker → its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for stage, marker in MARKERS.items()
            for p in (out / stage).glob(f"*/{marker}")}


def _stage_of(marker: str) -> str:
    stage, name = marker.split("/")[:2]
    if stage == "data":
        return "prepare"
    if stage == "models":
        return "build"
    if stage == "merge":
        return "merge"
    return f"{stage}:{name.rsplit('-', 1)[0]}"  # unlearn:<method>, eval:<label>


def _ran(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {_stage_of(m) for m, t in after.items() if before.get(m) != t}


def _edit_forget(tmp_path: Path) -> None:
    path = tmp_path / "forget.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["answer"] = "Qorvenhal."  # one answer of one person
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_cli_reruns_a_changed_stage_and_what_follows_it_only(tmp_path):
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, "cli")))
    out = tmp_path / "cli"
    exe = Path(sys.executable).parent / "unlearn"

    def run(overrides: list[str]) -> set[str]:
        before = _written(out)
        res = subprocess.run([str(exe), "eval", str(config), *overrides], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": "none"})
        assert res.returncode == 0, res.stderr
        return _ran(before, _written(out))

    overrides: list[str] = []
    assert run(overrides) == {"prepare", "build", *TRAINED, *EVALS}
    assert run(overrides) == set()
    for change, expected in CHANGES:
        if isinstance(change, str):
            _edit_forget(tmp_path)
        else:
            overrides += change
        assert run(overrides) == expected, change


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


FLOW_NAMES = {"prepare": "prepare", "build": "build-models", "merge": "merge", "unlearn:ga": "unlearn-ga"}


def _flow_names(stages: set[str]) -> set[str]:
    """The flow's task names for stages that run: any training job reruns the `train` task."""
    names = {FLOW_NAMES.get(s, s.replace("eval:", "eval-")) for s in stages if s != "unlearn:finetune"}
    return names | ({"train"} if stages & {"unlearn:ga", "unlearn:finetune"} else set())


def test_the_flow_reruns_a_changed_stage_and_what_follows_it_only(tmp_path, harness):
    from flows.pipeline import pipeline
    from unlearning.config import apply_overrides

    raw = _raw(tmp_path, "flow")
    out = tmp_path / "flow"

    def run(overrides: list[str]) -> tuple[set[str], set[str]]:
        before = _written(out)
        report = pipeline(apply_overrides(raw, overrides))
        return {name for name, state in report["stages"].items() if state != "Cached"}, _ran(before, _written(out))

    overrides: list[str] = []
    assert run(overrides)[1] == {"prepare", "build", *TRAINED, *EVALS}
    assert run(overrides) == (set(), set())
    for change, expected in CHANGES:
        if isinstance(change, str):
            _edit_forget(tmp_path)
        else:
            overrides += change
        assert run(overrides) == (_flow_names(expected), expected), change


def test_the_prepared_data_follows_the_records_of_a_dataset_directory_and_a_hub_revision(tmp_path, monkeypatch):
    import datasets

    from unlearning.config import validate_config
    from unlearning.errors import UserError
    from unlearning.stages import prepare, prepare_key

    files = _sources(tmp_path)
    rows = {s: [json.loads(line) for line in Path(p).read_text().splitlines()] for s, p in files.items()}
    local = tmp_path / "dataset"

    def save(answer: str) -> None:
        edited = {s: [dict(r, answer=answer) if s == "forget" and i == 0 else r for i, r in enumerate(rs)]
                  for s, rs in rows.items()}
        datasets.DatasetDict({s: datasets.Dataset.from_list(rs) for s, rs in edited.items()}).save_to_disk(str(local))

    raw = pico_raw(tmp_path / "run")
    raw["data"] = {"source": "hf", "path": str(local), "splits": {s: s for s in rows}, "max_length": 48,
                   "tokenizer": {"vocab_size": 400}}
    cfg = validate_config(raw)
    save("Qorvenhal.")
    first = prepare(cfg)
    assert prepare_key(cfg) == first.fingerprint
    save("Brastmoor.")  # the same directory, rewritten with one answer changed
    assert prepare_key(cfg) != first.fingerprint
    assert prepare(cfg).path != first.path

    # A hub dataset: the revision reaches `datasets`, and what it loads decides the key.
    loaded: list[str | None] = []

    def load_dataset(path, name=None, split=None, revision=None):
        loaded.append(revision)
        return datasets.Dataset.from_list([dict(r, answer=f"{r['answer']} {revision}") for r in rows[name]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = {**raw["data"], "path": "someone/invented-people"}
    keys = {rev: prepare_key(validate_config({**raw, "data": {**hub, "revision": rev}})) for rev in ("v1", "v2")}
    assert keys["v1"] != keys["v2"] and set(loaded) == {"v1", "v2"}
    with pytest.raises(UserError, match=r"data\.revision is read by source=hf only"):
        validate_config({**raw, "data": {"revision": "v1"}})
