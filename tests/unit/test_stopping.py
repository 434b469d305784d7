"""Stopping rules on a step's record (the loss bounds: KGA's rule, usable by any method) and KGA's checks."""

from __future__ import annotations

import pytest


def test_the_loss_bound_rules_stop_at_a_value_or_a_fraction_of_the_first_steps_loss():
    """KGA's stop rules, for any method: forget_loss_below stops at the first step whose loss is at most the
    value; forget_loss_fraction at the first at most that fraction of step 1's (kept across a resume), and a first
    loss that is not positive has no fraction to take: an error, not a silent run to max_steps."""
    from unlearning.schema import StopConfig
    from unlearning.train.stopping import StopRuleError, StopRules

    def rules(state=None, **stop):
        return StopRules(StopConfig(collapse=None, **stop), None, {}, tokenizer=type("T", (), {"pad_token_id": 0}),
                         template=None, max_length=8, batch_size=1, seed=0, state=state)

    def step(n, loss):
        return {"step": n, "forget_loss": loss, "forget_nll": 1.0}

    below = rules(forget_loss_below=0.5)
    assert below.after(step(1, 0.9)) is None and below.after(step(2, 0.5)) == "forget_loss_below"
    fraction = rules(forget_loss_fraction=0.25)
    assert [fraction.after(step(i, x)) for i, x in enumerate((2.0, 1.0, 0.6), 1)] == [None, None, None]
    assert fraction.after(step(4, 0.5)) == "forget_loss_fraction"
    resumed = rules(state=fraction.state(), forget_loss_fraction=0.25)
    assert resumed.after(step(5, 0.55)) is None and resumed.after(step(6, 0.45)) == "forget_loss_fraction"
    with pytest.raises(StopRuleError, match="first step's is -1"):
        rules(forget_loss_fraction=0.5).after(step(1, -1.0))


def test_kgas_new_data_must_be_a_split_the_target_never_trained_on(pico):
    """Found from the config and the prepared counts, before any model is built: a split the target trained on,
    a missing or empty split, and a given target with no base to fine-tune A_f and A_n from."""
    from unlearning.unlearn import auxiliary_problems

    counts = {"forget": 12, "retain": 24, "holdout": 12, "world_facts": 6, "empty": 0}
    assert auxiliary_problems(pico(method={"name": "kga"}), counts) == []
    assert auxiliary_problems(pico(method={"name": "npo"}), counts) == []
    (trained,) = auxiliary_problems(pico(method={"name": "kga", "new_data": "retain"}), counts)
    assert "must be disjoint from what the target was trained on" in trained
    (missing,) = auxiliary_problems(pico(method={"name": "kga", "new_data": "nosuch"}), counts)
    assert "the 'nosuch' split, which the prepared data does not have; splits: forget, retain, holdout" in missing
    (empty,) = auxiliary_problems(pico(method={"name": "kga", "new_data": "empty"}), counts)
    assert "has no rows of" in empty
    (base,) = auxiliary_problems(pico(method={"name": "kga"}, model={"target": "some/checkpoint"}), counts)
    assert "set model.base to the target's base model" in base
