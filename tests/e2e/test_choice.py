"""A WMDP-style multiple-choice benchmark end to end, as a user runs it: an invented 'hazardous' domain (lab agents)
and a general one (people) as text corpora, each asked as 4-option questions, through `unlearn run` (the Prefect
flow, a real MLflow store), with lm-evaluation-harness scoring the same questions beside our metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import pico_raw

CHOICE = {"forget_fraction": 0.2, "holdout_fraction": 0.1, "max_length": 64,
          "synthetic": {"num_entities": 20, "facts_per_entity": 6, "num_utility": 12, "format": "choice"},
          "tokenizer": {"vocab_size": 600}}


def test_the_target_knows_the_hazardous_domain_the_oracle_guesses_and_rmu_removes_it_keeping_the_general(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "choice.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", data=CHOICE,
        model={"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
               "finetune": {"epochs": 60, "batch_size": 8, "lr": 5e-3}},
        methods=[{"name": "rmu", "layer": "model.layers.1", "steering_coeff": 20.0, "alpha": 10.0}],
        train={"lr": 2e-3, "max_steps": 40, "batch_size": 2, "num_processes": 2},
        eval={"suite": "wmdp", "models": ["target", "oracle", "unlearned"], "verbmem_prefix": 16,
              "lm_eval": {"tasks": ["split:forget_choice", "split:retain_choice"]}},
        tracking={"uri": uri})))
    exe = Path(sys.executable).parent / "unlearn"
    bad = subprocess.run([str(exe), "run", str(config), "eval.lm_eval.tasks=[split:forget]"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "'forget' is not a prepared multiple-choice split" in bad.stderr
    assert not (tmp_path / "run/models").exists()

    res = subprocess.run([str(exe), "run", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = {p.name.rsplit("-", 1)[0]: json.loads((p / "eval.json").read_text())["metrics"]
             for p in (tmp_path / "run/eval").iterdir()}
    target, oracle, rmu = evals["target"], evals["oracle"], evals["rmu"]
    assert target["forget_choice_acc"] > 0.5 and oracle["forget_choice_acc"] < 0.4  # chance: 0.25
    assert rmu["forget_choice_acc"] < target["forget_choice_acc"] - 0.2
    assert rmu["retain_choice_acc"] > 0.85 * target["retain_choice_acc"]
    for model in evals.values():  # the harness, handed the same checkpoint, gives the same accuracies
        for split in ("forget_choice", "retain_choice"):
            assert model[f"lm_eval_{split}_acc"] == model[f"{split}_acc"]
            assert model[f"lm_eval_{split}_acc_norm"] == model[f"{split}_acc_norm"]
    report = (tmp_path / "run/report/report.md").read_text()
    assert "forget_choice_acc" in report and "retain_choice_acc" in report
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pico").experiment_id])}
    assert runs["eval-rmu"].data.metrics["lm_eval_forget_choice_acc"] == rmu["forget_choice_acc"]
