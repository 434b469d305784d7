from pathlib import Path

import pytest
import yaml

from unlearning.config import apply_overrides, load_config, parse_overrides, validate_config
from unlearning.errors import UserError
from unlearning.hashing import content_hash

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_demo_config_validates_and_defaults_output_dir(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(DEMO)
    assert cfg.name == "demo"
    assert cfg.out == Path("runs/demo")
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(DEMO, ["train.lr=1e-5", "methods=[{name: simnpo}]", "merge.lambdas=[1, 5]",
                             "model.target=null", "data.template.chat=false", "seed=7"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert [m["name"] for m in cfg.methods] == ["simnpo"]
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
        load_config(DEMO, ["trian.lr=1", "data.forget_fraction=1.5", "methods=[{name: npo, bta: 1}]",
                           "data.synthetic.num_entites=3", "train.zero_stage=5"])
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5
    assert "trian: unknown key; valid keys here: name, seed, seeds, output_dir, data, model" in text
    assert "data.forget_fraction: Input should be less than 1" in text
    assert "methods[0].bta: not a parameter of method 'npo'; valid: beta" in text
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


def test_retain_terms_come_from_their_registry_and_embed_diff_needs_a_layer():
    with pytest.raises(UserError, match=r"unknown retain loss 'mse'; valid: none, embed_diff, kl, nll"):
        validate_config({"name": "x", "method": {"name": "graddiff", "retain_loss": "mse"}})
    with pytest.raises(UserError, match=r"'embed_diff' compares the activations of the method's `layer`.*rmu"):
        validate_config({"name": "x", "method": {"name": "npo", "retain_loss": "embed_diff"}})
    with pytest.raises(UserError, match=r"method.retain_loss_eps: method 'pdu' needs it \(it has no default\)"):
        validate_config({"name": "x", "method": {"name": "pdu"}})
    rmu = validate_config({"name": "x", "method": {"name": "rmu", "layer": "model.layers.2"}})
    assert rmu.method.retain_loss == "embed_diff" and rmu.method.params["trainable"] == [".*"]


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


def test_methods_each_become_one_run_with_their_train_overrides():
    from unlearning.config import method_runs

    cfg = validate_config({"name": "x", "train": {"lr": 1e-4, "max_steps": 10, "stop": {"utility_every": 3}},
                           "methods": ["ga", {"name": "npo", "label": "npo_fast", "beta": 0.5,
                                              "train": {"lr": 1e-3, "stop": {"utility_floor": 0.5}}}]})
    runs = method_runs(cfg)
    assert list(runs) == ["ga", "npo_fast"]
    assert runs["ga"].train.lr == 1e-4 and runs["ga"].method.alpha == 0.0  # GA's registered default
    npo = runs["npo_fast"]
    assert npo.method.name == "npo" and npo.method.params["beta"] == 0.5 and npo.method.alpha == 1.0
    assert npo.train.lr == 1e-3 and npo.train.max_steps == 10  # overrides merge section by section
    assert npo.train.stop.utility_floor == 0.5 and npo.train.stop.utility_every == 3
    assert npo.methods == [] and validate_config(cfg.to_dict()) == cfg  # the resolved config round-trips
    assert method_runs(validate_config({"name": "x"})) == {"unlearned": validate_config({"name": "x"})}


def test_every_problem_in_methods_is_reported_with_its_entry():
    with pytest.raises(UserError) as e:
        validate_config({"name": "x", "methods": [
            {"name": "npo", "betta": 1}, {"name": "ga", "train": {"lrr": 1}}, {"name": "ga", "label": "target"},
            {"name": "nope"}, {"name": "npo"}, {"name": "npo", "train": {"batch_size": 0}}]})
    text = "\n".join(e.value.problems)
    assert "methods[0].betta: not a parameter of method 'npo'" in text
    assert "methods[1].train.lrr: unknown key; valid keys here: lr," in text
    assert "methods[2].label: 'target' must be a plain name other than target, oracle, unlearned" in text
    assert "methods[3].name: unknown method 'nope'" in text
    assert "methods[5].train.batch_size" in text
    assert "labels ['npo'] repeat; give each entry its own `label`" in text


def test_a_method_override_on_a_config_with_methods_says_how_to_override_the_list():
    with pytest.raises(UserError, match=r"method.name=npo overrides `method`, but .*demo.yaml lists `methods`.*"
                                        r"'methods=\[\{name: npo"):
        load_config(DEMO, ["method.name=npo"])


def test_a_tracking_uri_with_a_password_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert validate_config({"name": "x"}).tracking.uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert validate_config({"name": "x"}).tracking.uri == "http://mlflow:5000"
    with pytest.raises(UserError) as e:
        validate_config({"name": "x", "tracking": {"uri": "postgresql://me:hunter2@db/mlflow"}})
    assert "MLFLOW_TRACKING_PASSWORD" in str(e.value) and "hunter2" not in str(e.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"splits": {"forget": "f.jsonl"}}, "data.splits.forget: source=synthetic generates forget, retain, holdout, "
                                        "world_facts itself"),
    ({"path": "locuslab/TOFU"}, "data.path is read by source=hf only, and source is synthetic"),
    ({"source": "files", "splits": {"forget": "f.jsonl", "retain": "r.jsonl"}, "synthetic": {"num_entities": 9}},
     "data.synthetic: read by source=synthetic only, and source is files"),
    ({"source": "files", "splits": {"forget": "f.jsonl", "retain": "r.jsonl"}, "forget_fraction": 0.2},
     "data.forget_fraction: read by source=synthetic only"),
    ({"source": "files", "splits": {"forget": "f.jsonl", "retain": "r.jsonl"}, "columns": {"holdot": {"answer": "a"}}},
     "columns.holdot: not a split of data.splits (forget, retain)"),
    ({"columns": {"answer": "a"}}, "data.columns maps the columns of data.splits files, and source=synthetic names "
                                   "none"),
    ({"source": "hf", "path": "x", "splits": {"forget": "forget10", "retain": "retain90"},
      "columns": {"forget": {"anwser": "a"}}}, "columns.forget: unknown ['anwser']"),
])
def test_settings_the_chosen_source_would_ignore_are_errors(data, message):
    with pytest.raises(UserError) as e:
        validate_config({"name": "x", "data": data})
    assert message in str(e.value)


def test_seeds_repeat_the_run_on_the_data_of_one_seed():
    from unlearning.config import seed_runs

    cfg = validate_config({"name": "x", "seed": 3, "seeds": [0, 1, 2]})
    runs = seed_runs(cfg)
    assert list(runs) == [0, 1, 2] and [r.seed for r in runs.values()] == [0, 1, 2]
    assert {r.data_seed for r in runs.values()} == {3} and all(r.seeds == [] for r in runs.values())
    assert seed_runs(validate_config({"name": "x", "seed": 5})) == {5: validate_config({"name": "x", "seed": 5})}
    with pytest.raises(UserError, match="repeats a seed"):
        validate_config({"name": "x", "seeds": [1, 1]})


def test_eval_references_must_name_evaluated_models():
    cfg = validate_config({"name": "x", "eval": {"models": ["target", "oracle", "base=some/dir"],
                                                 "references": ["base"]}})
    assert cfg.eval.references == ["base"]
    with pytest.raises(UserError, match=r"references \['bsae'\] are not labels of eval.models"):
        validate_config({"name": "x", "eval": {"models": ["target", "base=some/dir"], "references": ["bsae"]}})


@pytest.mark.parametrize("data", [
    {},
    {"source": "files", "splits": {"forget": "f.jsonl", "retain": "r.jsonl"}},
    {"source": "hf", "path": "locuslab/TOFU", "revision": "main",
     "splits": {"forget": "forget10", "retain": "retain90"}},
])
def test_a_resolved_config_reads_back_as_itself(data):
    # What the training ranks get (a job spec) and config.resolved.json hold every key, defaults included.
    cfg = validate_config({"name": "x", "data": data})
    assert validate_config(cfg.to_dict()) == cfg
