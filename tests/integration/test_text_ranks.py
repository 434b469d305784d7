"""Unlearning on text chunks (every token scored) on real DeepSpeed ranks: NPO (cached reference log-probs of the
chunks) and GradDiff give the same steps on 1 rank × 4 and 2 ranks × 2, and lower the forget corpus's likelihood."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import MEMORISE, pico_raw
from tests.integration.unlearn_ranks import launch_specs
from unlearning.config import validate_config
from unlearning.evaluate.probes import answer_logprobs
from unlearning.models import build_models, load_causal_lm
from unlearning.stages import prepare
from unlearning.unlearn import job_spec

pytestmark = pytest.mark.distributed
TEXT = {"synthetic": {"num_entities": 12, "facts_per_entity": 4, "num_utility": 6, "format": "text"}}


def test_text_batches_train_the_same_on_one_rank_and_two_and_forget_the_corpus(tmp_path):
    def config(method: str, ranks: int, batch: int):
        return validate_config(pico_raw(tmp_path / "run", data=TEXT, model={"finetune": MEMORISE},
                                        method={"name": method},
                                        train={"lr": 1e-3, "max_steps": 4, "batch_size": batch,
                                               "num_processes": ranks}))

    base = config("npo", 2, 2)
    prepared = prepare(base)
    target = str(build_models(base, prepared).target)
    forget = list(prepared.splits()["forget"])
    assert all(r["labels"][1:] == r["input_ids"][1:] for r in forget)  # chunks: every token after BOS scored
    runs = {}
    for ranks, batch in ((2, 2), (1, 4)):
        specs = []
        for method in ("npo", "graddiff"):
            run_dir, spec = job_spec(config(method, ranks, batch), target, prepared)
            runs[method, ranks] = run_dir
            specs.append(spec)
        launch_specs(specs, ranks, tmp_path / f"specs{ranks}.json")

    def losses(method: str, ranks: int) -> list[float]:
        return [h["loss"] for h in json.loads((runs[method, ranks] / "run_summary.json").read_text())["losses"]]

    pad = prepared.tokenizer().pad_token_id
    before = answer_logprobs(load_causal_lm(target), forget, pad_id=pad)[0]
    for method in ("npo", "graddiff"):
        assert losses(method, 1) == pytest.approx(losses(method, 2), rel=1e-5, abs=1e-6)
        after = answer_logprobs(load_causal_lm(runs[method, 2] / "model"), forget, pad_id=pad)[0]
        assert np.mean(after) < np.mean(before)
