from pathlib import Path

import pytest
import yaml

from unlearning.config import apply_overrides, content_hash, load_config, parse_overrides, validate_config
from unlearning.errors import UserError

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_demo_config_validates_and_defaults_output_dir():
    cfg = load_config(DEMO)
    assert cfg.name == "demo"
    assert cfg.out == Path("runs/demo")
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(DEMO, ["train.lr=1e-5", "method.name=simnpo", "merge.lambdas=[1, 5]",
                             "model.target=null", "data.template.chat=false", "seed=7"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.method.name == "simnpo"
    assert cfg.merge.lambdas == [1.0, 5.0]
    assert cfg.model.target is None and cfg.seed == 7


def test_override_creates_missing_sections():
    raw = apply_overrides({"name": "x"}, ["train.lora.r=4"])
    assert raw == {"name": "x", "train": {"lora": {"r": 4}}}


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "1abc=2"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides([bad])


def test_every_problem_is_reported_at_once_with_valid_keys():
    with pytest.raises(UserError) as info:
        load_config(DEMO, ["trian.lr=1", "data.forget_fraction=1.5", "method.bta=1",
                           "data.synthetic.num_entites=3", "train.zero_stage=5"])
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5
    assert "trian: unknown key; valid keys here: name, seed, output_dir, data, model" in text
    assert "data.forget_fraction: Input should be less than 1" in text
    assert "method.bta: not a parameter of method 'npo'; valid: beta" in text
    assert "num_entites: unknown key; valid keys here: num_entities" in text
    assert "train.zero_stage" in text


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_fractions_must_lie_strictly_between_zero_and_one(fraction):
    with pytest.raises(UserError, match="forget_fraction"):
        validate_config({"name": "x", "data": {"forget_fraction": fraction}})


def test_fractions_must_leave_people_to_retain():
    with pytest.raises(UserError, match="leave people to retain"):
        validate_config({"name": "x", "data": {"forget_fraction": 0.5, "holdout_fraction": 0.5}})


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(UserError, match=r"unknown method 'npoo'; valid: .*graddiff.*npo.*simnpo"):
        validate_config({"name": "x", "method": {"name": "npoo"}})


def test_method_defaults_come_from_the_registered_function():
    cfg = validate_config({"name": "x", "method": {"name": "simnpo"}})
    assert (cfg.method.gamma, cfg.method.alpha, cfg.method.retain_loss) == (0.125, 1.0, "nll")
    assert cfg.method.params == {"beta": 4.5, "delta": 0.0}
    ga = validate_config({"name": "x", "method": {"name": "ga"}})
    assert (ga.method.alpha, ga.method.retain_loss) == (0.0, "none")
    explicit = validate_config({"name": "x", "method": {"name": "npo", "alpha": 0.5, "beta": "0.2"}})
    assert explicit.method.alpha == 0.5 and explicit.method.params == {"beta": 0.2}


def test_source_specific_requirements():
    with pytest.raises(UserError) as info:
        validate_config({"name": "x", "data": {"source": "hf", "splits": {"forget": "forget10"}}})
    text = str(info.value)
    assert "needs data.path" in text and "missing: ['retain']" in text
    with pytest.raises(UserError, match="not one of"):
        validate_config({"name": "x", "data": {"source": "files",
                                               "splits": {"forget": "a.txt", "retain": "b.jsonl"}}})


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-exp.yaml"
    path.write_text(yaml.safe_dump({"seed": 3}))
    assert load_config(path).name == "my-exp"


def test_content_hash_is_stable_and_order_insensitive():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
