"""A MUSE-style text benchmark end to end, as a user runs it: invented people's biographies as the forget and
retain corpora (chunked, every token scored), their QA pairs for KnowMem, through `unlearn run` (the Prefect flow,
a real MLflow store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import pico_raw

TEXT = {"forget_fraction": 0.2, "holdout_fraction": 0.2, "max_length": 64,
        "synthetic": {"num_entities": 20, "facts_per_entity": 6, "num_utility": 12, "format": "text",
                      "answer_style": "sentence"},
        "tokenizer": {"vocab_size": 600}}


def unlearn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "unlearn"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_the_target_memorises_the_forget_passages_the_oracle_does_not_and_npo_removes_them(tmp_path):
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", data=TEXT,
        model={"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
               "finetune": {"epochs": 60, "batch_size": 8, "lr": 5e-3}},
        methods=[{"name": "npo"}], train={"lr": 2e-3, "max_steps": 20, "batch_size": 2, "num_processes": 2},
        eval={"suite": "muse", "models": ["target", "oracle", "unlearned"], "verbmem_prefix": 16,
              "utility_splits": ["retain_qa", "world_facts"]},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})))
    res = unlearn("unlearn", str(config), "methods=[{name: idkdpo}]", cwd=tmp_path)
    assert res.returncode == 2 and "the forget split is text, which has no questions" in res.stderr
    assert not (tmp_path / "run/models").exists()

    res = unlearn("run", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(next((tmp_path / "run/data").glob("*/fingerprint.json")).read_text())
    assert info["documents"] == {"forget": 4, "holdout": 4, "retain": 12} and info["counts"]["forget"] > 4
    evals = {p.name.rsplit("-", 1)[0]: json.loads((p / "eval.json").read_text())["metrics"]
             for p in (tmp_path / "run/eval").iterdir()}
    target, oracle, npo = evals["target"], evals["oracle"], evals["npo"]
    assert target["forget_verbmem"] > 0.9 and target["retain_verbmem"] > 0.9  # trained on both corpora
    assert oracle["forget_verbmem"] < 0.5 < oracle["retain_verbmem"]  # never saw the forget passages
    assert npo["forget_verbmem"] < 0.5 * target["forget_verbmem"]
    assert target["mia_min_k_auc"] > oracle["mia_min_k_auc"]
    for model in evals.values():
        assert {"forget_qa_knowmem", "retain_qa_knowmem", "holdout_verbmem", "privleak", "model_utility"} <= set(model)
    report = (tmp_path / "run/report/report.md").read_text()
    assert "| forget_verbmem | retain_verbmem | forget_qa_knowmem | retain_qa_knowmem |" in report
