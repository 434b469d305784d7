"""How `sequence.requests` cuts the forget set into ordered requests, and what it refuses."""

from __future__ import annotations

import pytest

from tests.conftest import pico_raw
from unlearning.config import validate_config
from unlearning.errors import UserError
from unlearning.sequence import plan_requests

ENTITIES = ["Ana", "Ana", "Bo", "Bo", "Cy", "Cy", "Cy"]


def _cfg(tmp_path, requests):
    return validate_config(pico_raw(tmp_path, sequence={"requests": requests}))


def test_a_count_splits_the_entities_in_order(tmp_path):
    plan = plan_requests(_cfg(tmp_path, 2), ENTITIES)
    assert [(r.index, r.entities, r.rows) for r in plan] == [(1, ["Ana", "Bo"], [0, 1, 2, 3]), (2, ["Cy"], [4, 5, 6])]


def test_named_requests_keep_their_order(tmp_path):
    plan = plan_requests(_cfg(tmp_path, [["Cy"], ["Ana", "Bo"]]), ENTITIES)
    assert [r.rows for r in plan] == [[4, 5, 6], [0, 1, 2, 3]]


def test_rows_stand_for_themselves_without_an_entity_column(tmp_path):
    plan = plan_requests(_cfg(tmp_path, 3), [None] * 3)
    assert [r.rows for r in plan] == [[0], [1], [2]]


def test_bad_requests_are_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="only 3 entities; ask for at most 3"):
        plan_requests(_cfg(tmp_path, 4), ENTITIES)
    with pytest.raises(UserError) as e:
        plan_requests(_cfg(tmp_path, [["Ana", "Zed"], ["Ana"]]), ENTITIES)
    text = "\n".join(e.value.problems)
    assert "['Zed'] are not entities of the forget set; it has: Ana, Bo, Cy" in text
    assert "['Ana'] are requested more than once" in text
    with pytest.raises(UserError, match=r"sequence\.requests: must be at least 1"):
        _cfg(tmp_path, 0)


def test_a_suite_without_the_ledgers_metrics_is_refused_before_any_work(tmp_path):
    from unlearning.sequence import sequence

    with pytest.raises(UserError, match=r"eval.suite=muse lacks truth_ratio; use a suite "
                                        r"that has them: tofu"):
        sequence(validate_config(pico_raw(tmp_path / "run", eval={"suite": "muse"})))
    assert not (tmp_path / "run").exists()
