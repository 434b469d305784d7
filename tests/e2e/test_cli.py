"""The real `unlearn` command, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MEMORISE, REPO, pico_raw


def unlearn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "unlearn"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_validate_prints_the_resolved_config(tmp_path):
    res = unlearn("validate", str(REPO / "configs/demo.yaml"), "train.lr=3e-5",
                  "methods=[{name: simnpo, beta: 0.5, train: {max_steps: 7}}]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["train"]["lr"] == 3e-5
    assert "method" not in resolved  # replaced by `methods`
    assert resolved["methods"] == [{"label": "simnpo", "name": "simnpo", "gamma": 0.125, "alpha": 1.0,
                                     "retain_loss": "nll", "beta": 0.5, "delta": 0.0, "train": {"max_steps": 7}}]


def test_sweep_checks_its_grid_before_starting_anything(tmp_path):
    res = unlearn("sweep", str(REPO / "configs/demo.yaml"), "--grid", "train.warmup_ratio=1e-1,-1",
                  "train.zero_stage=2,7", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "grid point train.warmup_ratio=-1,train.zero_stage=7: train.warmup_ratio" in res.stderr
    assert "grid point train.warmup_ratio=0.1,train.zero_stage=7: train.zero_stage" in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    res = unlearn("sweep", str(REPO / "configs/demo.yaml"), "--grid", "method.name=ga,npo", cwd=tmp_path)
    assert res.returncode == 2 and "override the list instead" in res.stderr
    res = unlearn("sweep", str(REPO / "configs/demo.yaml"), "--grid", "train.lr=1e-4,5e-4", cwd=tmp_path)
    assert res.returncode == 2 and "every `methods` entry sets its own value" in res.stderr  # it would change nothing


def test_validate_lists_every_error_and_exits_nonzero(tmp_path):
    res = unlearn("validate", str(REPO / "configs/demo.yaml"), "trian.lr=1", "data.holdout_fraction=0", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in res.stderr


def test_prepare_then_build_models(tmp_path):
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(tmp_path / "run")))
    res = unlearn("prepare", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "forget" in res.stdout and "fingerprint" in res.stdout
    res = unlearn("build-models", str(config), "model.finetune.epochs=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run/models/summary.json").read_text())
    assert Path(summary["target"]).is_dir() and Path(summary["oracle"]).is_dir()
    assert "target" in res.stdout and "oracle" in res.stdout
    res = unlearn("build-models", str(config), "model.finetune.epochs=1", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count("cached") == 2


def test_bad_input_fails_before_work_and_keeps_outputs(tmp_path):
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(tmp_path / "run")))
    assert unlearn("prepare", str(config), cwd=tmp_path).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run/data").iterdir())
    res = unlearn("prepare", str(config), "data.forget_fraction=0.01", cwd=tmp_path)
    assert res.returncode == 2 and "selects nobody to forget" in res.stderr
    assert sorted(p.name for p in (tmp_path / "run/data").iterdir()) == before


def test_unlearn_on_two_ranks_with_lora_then_reuse_then_eval(tmp_path):
    """`unlearn unlearn` through the deepspeed launcher: IdkDPO with LoRA on 2 ranks under ZeRO-2; then
    `unlearn eval` on the target, the oracle and the unlearned model."""
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", model={"finetune": MEMORISE}, method={"name": "idkdpo"},
        train={"lr": 5e-3, "max_steps": 3, "batch_size": 2, "num_processes": 2, "launcher": "deepspeed",
               "lora": {"enabled": True, "r": 4}})))
    res = unlearn("unlearn", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unlearned (idkdpo): 3 steps on 2 rank(s), ZeRO-2, LoRA, stopped by max_steps" in res.stdout
    run = next((tmp_path / "run/unlearn").iterdir())
    summary = json.loads((run / "run_summary.json").read_text())
    probs = summary["probability"]
    assert probs["unlearned"]["forget"] < probs["target"]["forget"]
    assert Path(summary["adapter"], "adapter_model.safetensors").is_file()
    assert "deepspeed.launcher.runner" in (run / "train.log").read_text()
    again = unlearn("unlearn", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "(cached)" in again.stdout
    # Then evaluate target, oracle and that unlearned model (reused, not retrained).
    res = unlearn("eval", str(config), "eval.suite=quick", "eval.models=[target,oracle,unlearned]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(label in res.stdout for label in ("target", "oracle", "unlearned")) and "forget_quality" in res.stdout
    evals = {p.name.split("-")[0]: json.loads((p / "eval.json").read_text()) for p in (tmp_path / "run/eval").iterdir()}
    assert set(evals) == {"target", "oracle", "unlearned"}
    assert evals["unlearned"]["model"] == str(run / "model")
    assert evals["unlearned"]["metrics"]["forget_probability"] < evals["target"]["metrics"]["forget_probability"]
    assert evals["oracle"]["metrics"]["forget_quality"] is None and evals["target"]["metrics"]["forget_quality"] < 1
    # Then attack the same three models with two prompt attacks (the evaluations reused).
    res = unlearn("attack", str(config), "eval.suite=quick", "eval.models=[target,oracle,unlearned]", cwd=tmp_path)
    assert res.returncode == 2 and "error: attack.attacks is empty" in res.stderr and "Traceback" not in res.stderr
    res = unlearn("attack", str(config), "eval.suite=quick", "eval.models=[target,oracle,unlearned]",
                  "attack.attacks=[choice,prefix]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Robust forget quality" in res.stdout and "choice (chance 0.25)" in res.stdout
    attacked = {p.name.split("-")[0]: json.loads((p / "attack.json").read_text())
                for p in (tmp_path / "run/attack").iterdir()}
    assert set(attacked) == {"target", "oracle", "unlearned"}
    assert list(attacked["unlearned"]["points"]) == ["choice", "prefix"]
    assert attacked["unlearned"]["oracle"] == evals["oracle"]["model"]


def test_merge_then_eval_the_merged_models(tmp_path):
    """`unlearn merge`: a forget fine-tune (1 rank), then θ − λ·τ for each λ; `unlearn eval` picks them up."""
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", model={"finetune": MEMORISE}, train={"num_processes": 1, "batch_size": 4},
        merge={"lambdas": [0.0, 3.0], "finetune": {"lr": 3e-3, "max_steps": 4}})))
    bad = unlearn("merge", str(config), "merge.method=task_arithmetc", cwd=tmp_path)
    assert bad.returncode == 2 and "merge.method: unknown merge 'task_arithmetc'; valid: task_arithmetic" in bad.stderr
    res = unlearn("merge", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merged_l0" in res.stdout and "merged_l3" in res.stdout
    summary = json.loads((tmp_path / "run/merge/summary.json").read_text())
    assert summary["probability"]["merged_l0"] == summary["probability"]["target"]
    res = unlearn("eval", str(config), "eval.models=[target,merged]", "eval.suite=quick", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "run/eval").iterdir()}
    assert evals == {"target", "merged_l0", "merged_l3"}


def test_in_context_methods_evaluate_on_the_target_without_a_launch(tmp_path):
    """`unlearn eval` with ICUL (n = 2 and 4, perturbed and refusal flips) and the instruction baseline: no rank
    starts, each is evaluated on the target's weights under its own prompts, and `unlearn unlearn` and the attack
    stage say why they leave them out."""
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", model={"finetune": MEMORISE},
        methods=[{"name": "icul", "n": 2}, {"name": "icul", "label": "icul4_refusal", "n": 4, "flip": "refusal"},
                 {"name": "instruct"}],
        eval={"suite": "quick", "models": ["target", "oracle", "unlearned"], "context_length": 256})))
    res = unlearn("eval", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training" not in res.stderr and not (tmp_path / "run/unlearn").exists()
    evals = {p.name.rsplit("-", 1)[0]: json.loads((p / "eval.json").read_text())
             for p in (tmp_path / "run/eval").iterdir()}
    assert set(evals) == {"target", "oracle", "icul", "icul4_refusal", "instruct"}
    target = evals["target"]
    for label, method in (("icul", "icul"), ("icul4_refusal", "icul"), ("instruct", "instruct")):
        ev = evals[label]
        assert label in res.stdout and ev["model"] == target["model"] and ev["identity"] != target["identity"]
        assert ev["context"]["method"]["name"] == method
        assert ev["context"]["encoding"]["forget"]["demos_dropped"] == 0
        # Same weights, other prompts: every forget answer is scored differently from the target's.
        ours, theirs = (e["per_example"]["forget_probability"] for e in (ev, target))
        assert all(abs(a - b) > 1e-6 for a, b in zip(ours, theirs, strict=True))
    # The model's own window (48 tokens here) cuts the contexts: a warning says so, and what was dropped is counted.
    res = unlearn("eval", str(config), "eval.context_length=null", "eval.models=[target,oracle,unlearned]",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: icul: the window of 48 tokens (the model's max_position_embeddings) shortened" in res.stderr
    res = unlearn("unlearn", str(config), cwd=tmp_path)
    assert res.returncode == 0 and "icul, icul4_refusal, instruct: in-context, nothing to train" in res.stdout
    res = unlearn("attack", str(config), "attack.attacks=[prefix]", "attack.models=[icul]", cwd=tmp_path)
    assert res.returncode == 2 and "attack.models: ['icul'] are in-context methods" in res.stderr


@pytest.mark.slow  # about 70 s; the same stage runs in the default suite through the flow (test_pipeline.py)
def test_kga_builds_its_auxiliary_models_then_unlearns_on_two_ranks(tmp_path):
    """`unlearn unlearn` with KGA: a new-data split that is not there, or that the target trained on, is refused
    before anything is built; then A_f (forget) and A_n (holdout) are fine-tuned by the target's recipe beside the
    target, the paired gaps are computed once, and 2 ranks align the forget gap; `build-models` lists the
    auxiliary models as cached, and a rerun reuses the run."""
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", model={"finetune": MEMORISE}, method={"name": "kga"},
        train={"lr": 5e-3, "max_steps": 4, "batch_size": 2, "num_processes": 2})))
    for bad, message in (("method.new_data=retain", "must be disjoint from what the target was trained on"),
                         ("method.new_data=nosuch", "fine-tunes a model on the 'nosuch' split, which the prepared "
                                                    "data does not have")):
        res = unlearn("unlearn", str(config), bad, cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "run/models").exists()
    res = unlearn("unlearn", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unlearned (kga): 4 steps on 2 rank(s), ZeRO-2, stopped by max_steps" in res.stdout
    built = json.loads((tmp_path / "run/models/summary.json").read_text())
    assert sorted(built["auxiliary"]) == ["aux-forget", "aux-holdout"]
    assert {built["builds"][r]["splits"][0] for r in built["auxiliary"]} == {"forget", "holdout"}
    (constants,) = (tmp_path / "run/constants").iterdir()
    run = next((tmp_path / "run/unlearn").iterdir())
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["probability"]["unlearned"]["forget"] < summary["probability"]["target"]["forget"]
    assert all(h["forget_loss"] >= 0 and h["retain_loss"] >= 0 for h in summary["losses"])
    res = unlearn("build-models", str(config), cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count("cached") == 4, res.stdout
    again = unlearn("unlearn", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "(cached)" in again.stdout
    assert list((tmp_path / "run/constants").iterdir()) == [constants]
