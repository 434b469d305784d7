"""Loading an experiment config: one flat YAML per experiment, validated before anything expensive runs.

`load_config(path, overrides)` reads the YAML, applies `KEY=VALUE` overrides (values parsed as YAML, so
`train.lr=1e-5`, `merge.lambdas=[1,5]`, `model.target=null` work), validates every section with pydantic
(`unlearning.schema`: unknown keys rejected, with the valid keys listed) and the method's parameters against
the method registry, and returns the resolved `ExperimentConfig`, or raises one `UserError` listing every
problem. `method_runs` and `seed_runs` resolve a config into the runs it stands for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from unlearning.errors import UserError
from unlearning.schema import ExperimentConfig, MethodConfig, TrainConfig


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Turn `a.b.c=value` strings into (path, value) pairs, the value parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise UserError(f"override {item!r} is not KEY=VALUE with a dotted key, e.g. train.lr=1e-5")
        parsed.append((key.split("."), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `KEY=VALUE` override set (creating sections as needed)."""
    result = json.loads(json.dumps(raw))
    for path, value in parse_overrides(overrides):
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub)model that `loc`'s parent points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(e: pydantic.ValidationError) -> list[str]:
    problems = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key; valid keys here: {', '.join(_valid_keys(ExperimentConfig, loc))}")
        elif err["type"] == "missing":
            problems.append(f"{key}: required but missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            secret = loc[-1:] == ("uri",)  # a URI with a password is never echoed back
            shown = "" if isinstance(err.get("input"), dict) or secret else f" (got {err.get('input')!r})"
            problems.append(f"{key}: {msg}{shown}")
    return problems


def _resolve_method(raw_method: Any, where: str = "method") -> tuple[dict[str, Any], list[str]]:
    """Validate the method's parameters against its registered function; fill in its defaults."""
    from unlearning.methods import METHODS  # the registry needs torch; import only when validating

    if not isinstance(raw_method, dict):
        return {}, [f"{where}: must be a section with at least `name`"]
    core = {k: raw_method[k] for k in ("name", "gamma", "alpha", "retain_loss") if k in raw_method}
    name = core.get("name", MethodConfig.model_fields["name"].default)
    extra = {k: v for k, v in raw_method.items() if k not in core}
    params, problems = METHODS.validate(name, extra, where=where)
    if problems:
        return {}, problems
    entry = METHODS.get(name)
    meta = entry.meta
    retain = core.get("retain_loss") or meta.get("retain_loss", "none")
    problems += _retain_problems(name, str(retain), entry, params, where)
    if problems:
        return {}, problems
    resolved = {
        "name": name,
        "gamma": core.get("gamma") if core.get("gamma") is not None else meta.get("gamma", 1.0),
        "alpha": core.get("alpha") if core.get("alpha") is not None else meta.get("alpha", 0.0),
        "retain_loss": retain,
    }
    return {**resolved, **params}, []


def _retain_problems(name: str, retain: str, entry: Any, params: dict[str, Any], where: str) -> list[str]:
    """The retain term must be registered, and one that reads hidden states needs the method's `layer`."""
    from unlearning.methods import RETAIN_LOSSES, reads

    if retain == "none":
        return []
    if retain not in RETAIN_LOSSES:
        return [f"{where}.retain_loss: unknown retain loss {retain!r}; valid: none, {', '.join(RETAIN_LOSSES.names())}"]
    hidden = any(r.kind == "hidden" for r in reads(RETAIN_LOSSES.get(retain)).values())
    if hidden and "layer" not in params:
        return [f"{where}.retain_loss: {retain!r} compares the activations of the method's `layer`, and method "
                f"{name!r} has none; use nll or kl, or a method with a layer (rmu)"]
    return []


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, section by section (a copy; neither argument is modified)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


RESERVED_LABELS = ("target", "oracle", "unlearned")


def _resolve_methods(raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate each `methods` entry (its method parameters and its `train` overrides); fill in defaults."""
    entries = raw.get("methods") or []
    if not isinstance(entries, list):
        return [], ["methods: must be a list of method sections, e.g. [{name: ga}, {name: npo, beta: 0.1}]"]
    resolved, problems, labels = [], [], []
    for i, entry in enumerate(entries):
        where = f"methods[{i}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a method section (name and parameters) or a method name")
            continue
        entry = dict(entry)
        label = str(entry.pop("label", None) or entry.get("name", MethodConfig.model_fields["name"].default))
        train = entry.pop("train", None) or {}
        method, method_problems = _resolve_method(entry, where)
        problems += method_problems
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label) or label in RESERVED_LABELS or \
                label.startswith("merged_l"):
            problems.append(f"{where}.label: {label!r} must be a plain name other than {', '.join(RESERVED_LABELS)} "
                            "and merged_l…")
        labels.append(label)
        if not isinstance(train, dict):
            problems.append(f"{where}.train: must be a section of train overrides, e.g. {{lr: 1.0e-4}}")
            continue
        # Problems of the merged section that the overrides brought in (the base section's are reported once).
        problems += [f"{where}.{p}" for p in _train_problems(deep_merge(raw.get("train") or {}, train))
                     if p not in _train_problems(raw.get("train") or {})]
        resolved.append({"label": label, **method, "train": train})
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        problems.append(f"methods: labels {repeated} repeat; give each entry its own `label`")
    return resolved, problems


def _train_problems(train: Any) -> list[str]:
    try:
        ExperimentConfig.model_validate({"name": "check", "train": train})
    except pydantic.ValidationError as e:
        return _format_errors(e)
    return []


def method_runs(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """Label → the config of one unlearning run: `methods` entries, or `method` alone labelled `unlearned`."""
    if not cfg.methods:
        return {"unlearned": cfg}
    runs = {}
    for entry in cfg.methods:
        method = {k: v for k, v in entry.items() if k not in ("label", "train")}
        train = TrainConfig.model_validate(deep_merge(cfg.train.model_dump(), entry.get("train") or {}))
        runs[entry["label"]] = cfg.model_copy(update={"method": MethodConfig(**method), "train": train, "methods": []})
    return runs


def trained_runs(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """`method_runs` without the in-context methods, which train nothing: the runs that are training jobs."""
    from unlearning.methods import in_context  # the registry needs torch; import only when asked

    return {label: run for label, run in method_runs(cfg).items() if not in_context(run.method)}


def in_context_labels(cfg: ExperimentConfig) -> list[str]:
    """The labels of `method_runs` that are in-context methods (evaluated on the target, never trained)."""
    return [label for label in method_runs(cfg) if label not in trained_runs(cfg)]


def seed_runs(cfg: ExperimentConfig) -> dict[int, ExperimentConfig]:
    """Seed → the config of one repetition: `seeds` each on the data of `data_seed`, or the config alone."""
    if not cfg.seeds:
        return {cfg.seed: cfg}
    data = cfg.data.model_copy(update={"seed": cfg.data_seed})
    return {s: cfg.model_copy(update={"seed": s, "seeds": [], "data": data}) for s in cfg.seeds}


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw config mapping; raise one `UserError` with every problem found."""
    if not isinstance(raw, dict):
        raise UserError("the config must be a YAML mapping of sections (name, data, model, ...)")
    problems: list[str] = []
    method, method_problems = _resolve_method(raw.get("method", {}))
    problems += method_problems
    methods, methods_problems = _resolve_methods(raw)
    problems += methods_problems
    try:
        cfg = ExperimentConfig.model_validate({**raw, **({"method": method} if method else {}),
                                               **({"methods": methods} if methods else {})})
    except pydantic.ValidationError as e:
        problems += _format_errors(e)
        raise UserError(problems) from e
    from unlearning.evaluate.suites import SUITES  # registries: torch is imported already (methods)
    from unlearning.merge.streaming import MERGES

    if cfg.eval.suite not in SUITES:
        problems.append(f"eval.suite: unknown suite {cfg.eval.suite!r}; valid: {', '.join(SUITES)}")
    if cfg.merge.method not in MERGES:
        problems.append(f"merge.method: unknown merge {cfg.merge.method!r}; valid: {', '.join(MERGES.names())}")
    if problems:
        raise UserError(problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply `KEY=VALUE` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML file such as configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from e
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
        check_method_overrides(raw, overrides or [], str(path))
    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw, dict) and raw.get("methods") == []:  # written out, not left to its default
        raise UserError(f"{path}: methods is an empty list, which would run the default method; list the methods to "
                        "run (methods=[{name: npo}]) or remove the key and configure `method`")
    return validate_config(raw)


def check_method_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> None:
    """Refuse `method.*` overrides of a config whose `methods` list would silently ignore them."""
    method_keys = [o for o in overrides if o.split("=", 1)[0].split(".")[0] == "method"]
    if raw.get("methods") and method_keys:
        raise UserError(f"{method_keys[0]} overrides `method`, but {source} lists `methods`, which replace it; "
                        "override the list instead, e.g. 'methods=[{name: npo, alpha: 5.0}]'")


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (without the unused `method` section when `methods` replaces it)."""
    resolved = cfg.to_dict()
    if cfg.methods:
        del resolved["method"]
    return yaml.safe_dump(resolved, sort_keys=False)
