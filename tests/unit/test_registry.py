import pytest

from unlearning.errors import UserError
from unlearning.registry import Registry


def make_registry() -> Registry:
    reg = Registry("thing")

    @reg.register("scale", flavour="x")
    def scale(x: float, *, factor: float = 2.0, steps: int = 1) -> float:
        return x * factor * steps

    return reg


def test_keyword_only_arguments_are_the_schema():
    reg = make_registry()
    entry = reg.get("scale")
    assert list(entry.params) == ["factor", "steps"]
    assert entry.defaults() == {"factor": 2.0, "steps": 1}
    assert entry.meta == {"flavour": "x"}


def test_validate_coerces_types_and_fills_defaults():
    params, problems = make_registry().validate("scale", {"factor": "3"}, where="t")
    assert problems == [] and params == {"factor": 3.0, "steps": 1}


def test_validate_reports_unknown_and_ill_typed_params():
    _, problems = make_registry().validate("scale", {"factr": 1, "steps": "many"}, where="t")
    assert any("t.factr: not a parameter of thing 'scale'; valid: factor, steps" in p for p in problems)
    assert any(p.startswith("t.steps:") for p in problems)


def test_unknown_name_and_duplicate_registration():
    reg = make_registry()
    with pytest.raises(UserError, match="unknown thing 'nope'; valid things: scale"):
        reg.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("scale")(lambda: None)
    with pytest.raises(ValueError, match="lowercase"):
        reg.register("Bad")
