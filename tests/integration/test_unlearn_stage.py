"""The unlearn stage as users run it: checks before launching, optimizer offload (its faults: tests/faults)."""

from __future__ import annotations

import pytest

from tests.conftest import MEMORISE, pico_raw
from unlearning.config import validate_config
from unlearning.errors import UserError
from unlearning.unlearn import unlearn

pytestmark = pytest.mark.distributed

FINETUNE = MEMORISE


def config(out, **train):
    return validate_config(pico_raw(out, model={"finetune": FINETUNE}, method={"name": "npo"},
                                    train={"lr": 1e-3, "batch_size": 2, "num_processes": 2, **train}))


def test_problems_are_reported_before_any_rank_starts(tmp_path):
    cfg = config(tmp_path, batch_size=8, grad_accum=2, lora={"enabled": True, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(UserError) as e:
        unlearn(cfg)
    text = "\n".join(e.value.problems)
    assert "forget set has 12 examples, fewer than one global batch (8 × 2 accumulation × 2 ranks = 32)" in text
    assert "['qkv'] are not linear layers" in text and "q_proj" in text
    assert not (tmp_path / "unlearn").exists() and not (tmp_path / "models").exists()  # nothing built or run
    with pytest.raises(UserError, match=r"hostfile.*does not exist"):
        unlearn(config(tmp_path, hostfile=str(tmp_path / "nope")))


def test_a_method_layer_or_trainable_set_the_model_lacks_is_reported_before_any_rank_starts(tmp_path):
    raw = pico_raw(tmp_path, model={"finetune": FINETUNE}, train={"batch_size": 2, "num_processes": 2},
                   method={"name": "rmu", "layer": "model.layers.7", "trainable": [r"model\.layers\.9\..*"]})
    with pytest.raises(UserError) as e:
        unlearn(validate_config(raw))
    text = "\n".join(e.value.problems)
    assert "method.layer: 'model.layers.7' is not a module of the tiny model; its decoder layers are " \
           "model.layers.0 to model.layers.1" in text
    assert r"method.trainable: ['model\\.layers\\.9\\..*'] match no parameter of the tiny model" in text
    assert not (tmp_path / "unlearn").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_optimizer_offload_trains_and_matches_the_plain_run(tmp_path):
    """ZeRO-2 with the optimizer on the CPU uses DeepSpeed's CPU Adam (a one-time ~60 s JIT build): the
    same AdamW maths as the torch implementation, so the first loss agrees exactly and later ones closely."""
    plain = unlearn(config(tmp_path, max_steps=3))
    offload = unlearn(config(tmp_path, max_steps=3, offload="optimizer"))
    a, b = ([h["loss"] for h in r.summary["losses"]] for r in (plain, offload))
    assert a[0] == pytest.approx(b[0], rel=1e-6) and a == pytest.approx(b, rel=1e-3)
