"""Every config shipped in configs/ validates offline (no model or data set is downloaded), as a user would
first run it: `unlearn validate CONFIG`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from unlearning.config import load_config, method_runs, seed_runs

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_the_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tofu_llama3.2-1b_forget10.yaml", "tofu_llama2-7b_forget01.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_validates_and_each_run_resolves(path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    for run in seed_runs(cfg).values():
        for label, method in method_runs(run).items():
            assert method.method.name and method.train.max_steps >= 1, label


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("tofu_")], ids=lambda p: p.stem)
def test_the_tofu_configs_follow_open_unlearnings_recipe(path: Path):
    """A global batch of 32 (micro-batch × accumulation × ranks) for 10 epochs of the forget split at lr 1e-5,
    against the published retain model of the same split."""
    cfg = load_config(path)
    split = path.stem.rsplit("forget", 1)[1]
    forget_items = {"01": 40, "05": 200, "10": 400}[split]
    t = cfg.train
    assert t.batch_size * t.grad_accum * t.num_processes == 32 and t.lr == 1e-5
    assert t.max_steps == 10 * (forget_items // 32)  # an epoch: the whole global batches of the forget set
    assert cfg.data.splits["forget"] == f"forget{split}_perturbed" and cfg.data.splits["holdout"] == f"holdout{split}"
    assert cfg.model.oracle is not None and cfg.model.oracle.endswith(f"retain{100 - int(split)}")


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("muse_") and "knowmem" in p.name],
                         ids=lambda p: p.stem)
def test_the_muse_configs_follow_open_unlearnings_recipe(path: Path):
    """MUSE's published target and retrain models of the corpus, its knowmem QA splits, a global batch of 32 at
    lr 1e-5 for 10 epochs of the 100 forget questions, and ZeRO-3 for a 7B full fine-tune."""
    cfg = load_config(path)
    corpus = path.stem.split("_")[1].capitalize()
    assert cfg.data.path == f"muse-bench/MUSE-{corpus}" and cfg.data.splits["forget"] == "knowmem:forget_qa"
    assert (cfg.model.target, cfg.model.oracle) == (f"muse-bench/MUSE-{corpus}_target",
                                                    f"muse-bench/MUSE-{corpus}_retrain")
    t = cfg.train
    assert t.batch_size * t.grad_accum * t.num_processes == 32 and t.lr == 1e-5 and t.max_steps == 10 * (100 // 32)
    assert t.zero_stage == 3 and t.bf16 and cfg.eval.suite == "muse"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("muse_") and "text" in p.name],
                         ids=lambda p: p.stem)
def test_the_muse_text_configs_unlearn_the_raw_corpus_and_measure_verbmem_and_knowmem(path: Path):
    """MUSE as MUSE runs it: the raw forget corpus (text) against the published target and retrain models, the
    knowmem QA splits beside it, the muse suite, open-unlearning's rate and global batch, ZeRO-3 for 7B."""
    cfg = load_config(path)
    corpus = path.stem.split("_")[1].capitalize()
    assert cfg.data.path == f"muse-bench/MUSE-{corpus}"
    assert (cfg.data.splits["forget"], cfg.data.splits["holdout"]) == ("raw:forget", "raw:holdout")
    assert cfg.data.splits["forget_qa"] == "knowmem:forget_qa" and cfg.eval.suite == "muse"
    assert (cfg.model.target, cfg.model.oracle) == (f"muse-bench/MUSE-{corpus}_target",
                                                    f"muse-bench/MUSE-{corpus}_retrain")
    t = cfg.train
    assert t.batch_size * t.grad_accum * t.num_processes == 32 and t.lr == 1e-5 and t.zero_stage == 3


def test_the_wmdp_config_is_rmu_as_wmdp_runs_it_scored_by_the_harness():
    cfg = load_config(REPO / "configs/experiments/wmdp_cyber_zephyr-7b.yaml")
    (run,) = method_runs(cfg).values()
    m = run.method
    assert (m.name, m.params["layer"], m.params["steering_coeff"], m.alpha) == ("rmu", "model.layers.7", 6.5, 1200.0)
    assert run.train.lr == 5e-5 and run.train.max_steps * run.train.batch_size == 600
    assert cfg.eval.lm_eval.tasks == ["wmdp_cyber", "mmlu"] and "oracle" not in cfg.eval.models
