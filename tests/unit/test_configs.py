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


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("muse_")], ids=lambda p: p.stem)
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
