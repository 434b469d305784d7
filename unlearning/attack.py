"""The attack stage: does the forgetting survive relearning, quantization, another question format, or facts
given in context?

Every attack is applied to each attacked model and to the oracle alike, and each attacked model's forget
quality is measured against the oracle *under the same attack* ("robust forget quality"): recovery counts
only beyond what a model that never saw the forget set gains. The attacks (one "point" each):

- `relearn@k`: the model fine-tuned k steps on one half of the forget set (by person; `finetune` method,
  the training engine as for any run, cached like one); `forget` is then the held-out half (recovery of
  facts never relearned) and `forget_relearned` the trained half.
- `quantize:<scheme>`: the model loaded with its decoder's linear layers quantized by bitsandbytes.
- `choice`, `cloze`, `paraphrase`, `context`, `prefix`: the forget questions asked another way
  (`unlearning/evaluate/attacks.py`); the weights are untouched, so utility is the plain evaluation's.

Per point: forget probability, truth ratio and ROUGE after the attack, forget quality against the attacked
oracle, accuracy against chance where the attack is a choice, and utility (retain probability, the utility
sets' accuracy) after the weight attacks. Output per model: `<output_dir>/attack/<label>-<key>/attack.json`,
cached by content like an evaluation.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.config import in_context_labels
from unlearning.data.prepare import PreparedData, derive
from unlearning.errors import UserError, raise_if
from unlearning.evaluate import attacks as attack_defs
from unlearning.evaluate.attacks import (
    PROMPTS,
    QUANT_SCHEMES,
    encoded,
    entity_halves,
    one_question,
    point_kind,
    quantization_config,
)
from unlearning.evaluate.metrics import choice_accuracy
from unlearning.evaluate.runner import ModelEval, _device, compute_metrics, definitions_hash, evaluated_rows, run_probes
from unlearning.hashing import content_hash
from unlearning.models import DTYPES, load_causal_lm, model_identity
from unlearning.schema import ExperimentConfig
from unlearning.unlearn import RUN_SETTINGS, data_problems, forget_finetune, launch_problems, unlearn_many, world_size

ATTACK_VERSION = 1
ATTACK_METRICS = ("probability", "choice_accuracy", "rouge", "truth_ratio", "forget_quality")
WEIGHT_ATTACKS = ("relearn", "quantize")
PROMPT_LENGTH_FACTOR = 8  # attacked prompts (context, options) are longer: encoded up to 8 × data.max_length


@dataclass(frozen=True)
class Attacked:
    """Per attacked label: its attack.json (`paths`) and the parsed results (point → metrics, unavailable)."""

    results: dict[str, dict[str, Any]]
    paths: dict[str, Path]
    points: list[str]

    def metrics(self, label: str) -> dict[str, float | None]:
        """`<point>/<metric>` → value for one label (what the report and MLflow show)."""
        return {f"{point}/{k}": v for point, r in self.results[label]["points"].items()
                for k, v in r["metrics"].items()}


def attack_points(cfg: ExperimentConfig) -> list[str]:
    """The names of the configured attacks' points, in config order."""
    a = cfg.attack
    names: list[str] = []
    for name in a.attacks:
        if name == "relearn":
            names += [f"relearn@{k}" for k in a.relearn.steps]
        elif name == "quantize":
            names += [f"quantize:{s}" for s in a.quantize.schemes]
        else:
            names.append(name)
    return names


def attacked_labels(cfg: ExperimentConfig, evals: dict[str, ModelEval]) -> list[str]:
    """The oracle first, then `attack.models` (default: every evaluated model but in-context ones, whose weights
    are the target's: the attacks change weights or the question, not the context they would have to keep)."""
    chosen = cfg.attack.models if cfg.attack.models is not None else [
        label for label, r in evals.items() if not r.in_context]
    return ["oracle", *(label for label in chosen if label != "oracle")]


def attack_problems(cfg: ExperimentConfig, evals: dict[str, ModelEval]) -> list[str]:
    problems = []
    if not cfg.attack.attacks:
        problems.append("attack.attacks is empty; name the attacks to run, e.g. attack.attacks=[relearn,quantize,"
                        "choice,cloze,paraphrase,context,prefix]")
    if "oracle" not in evals:
        problems.append("the attack stage needs the oracle evaluated (robust forget quality compares each model "
                        "with the oracle under the same attack); add oracle to eval.models")
    unknown = [m for m in cfg.attack.models or [] if m not in evals]
    if unknown:
        problems.append(f"attack.models: {unknown} are not evaluated models; evaluated: {', '.join(evals)}")
    problems += _in_context_problems([m for m in cfg.attack.models or [] if m in evals and evals[m].in_context])
    if any(s != "none" for s in cfg.attack.quantize.schemes) and "quantize" in cfg.attack.attacks:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append("attack: quantize needs bitsandbytes (pip install bitsandbytes; requirements.lock pins "
                            "it), or drop quantize from attack.attacks")
    return problems


def relearn_steps(cfg: ExperimentConfig) -> list[int]:
    """The relearning step counts that train (k > 0), ascending: the last is the run, the others its snapshots."""
    return sorted({k for k in cfg.attack.relearn.steps if k})


def relearn_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The relearning fine-tune: descent on the forget NLL (`finetune`), attack.relearn's lr held constant (no
    warm-up, no decay), max(attack.relearn.steps) steps with a snapshot at every other k, so the snapshot at k is
    exactly a k-step fine-tune and one run serves every k; no stop rules, full or LoRA; the launch (ranks, ZeRO,
    batch) as the config's training."""
    r = cfg.attack.relearn
    steps = relearn_steps(cfg)
    return forget_finetune(cfg, lr=r.lr, max_steps=max(steps, default=1), lora=r.lora, snapshot_every=0,
                           snapshot_steps=steps[:-1], schedule="constant", warmup_ratio=0.0,
                           batch_size=r.batch_size or cfg.train.batch_size)


def _in_context_problems(labels: list[str]) -> list[str]:
    return [f"attack.models: {labels} are in-context methods, which the attacks do not support (they attack "
            "weights, and these are the target's); leave them out"] if labels else []


def preflight_problems(cfg: ExperimentConfig, prepared: PreparedData) -> list[str]:
    """What the attack stage would refuse, found from the config and the data before any model is built."""
    context = in_context_labels(cfg)
    named = _in_context_problems([m for m in cfg.attack.models or [] if m in context])
    if named:
        return named
    if "relearn" not in cfg.attack.attacks:
        return []
    try:
        data, _, _ = relearn_data(cfg, prepared)
    except UserError as e:
        return [f"attack.relearn: {p}" for p in e.problems]
    run = relearn_config(cfg)
    where = "attack.relearn (attack.relearn.batch_size, default train.batch_size, sets its batch)"
    return [f"{where}: {p}" for p in launch_problems(run) + data_problems(run, data)]


def relearn_data(cfg: ExperimentConfig, prepared: PreparedData) -> tuple[PreparedData, list[int], list[int]]:
    """The relearning data (the forget split's relearned half only, the other splits whole) and the two halves'
    row indices in the forget split."""
    forget = list(prepared.splits()["forget"])
    trained, held_out = entity_halves(forget, cfg.data_seed)
    if not trained or not held_out:
        raise UserError(f"relearning splits the forget set's people in two halves, but it has "
                        f"{len({r.get('entity') for r in forget})} person(s); forget at least 2 people")
    return derive(prepared, "relearn-half", {"forget": trained}), trained, held_out


@functools.cache
def _code_hash() -> str:
    import unlearning.attack as stage

    return content_hash(definitions_hash(), inspect.getsource(attack_defs), inspect.getsource(stage))


def attack_key(cfg: ExperimentConfig, prepared: PreparedData, label: str, path: Path,
               oracle_identity: str | None) -> str:
    """Everything one model's attack results depend on (its directory name and cache key)."""
    return content_hash(ATTACK_VERSION, _code_hash(), label == "oracle", model_identity(path), prepared.fingerprint,
                        cfg.attack.model_dump(exclude={"models"}), cfg.eval.model_dump(exclude={"models", "snapshots"}),
                        cfg.data.template.model_dump(), cfg.data.max_length, cfg.model.dtype, cfg.data_seed,
                        cfg.train.model_dump(exclude=RUN_SETTINGS), world_size(cfg), cfg.seed, oracle_identity)


def attack_dirs(cfg: ExperimentConfig, prepared: PreparedData, evals: dict[str, ModelEval]) -> dict[str, Path]:
    """Label → the directory of each attacked model's results, named by its `attack_key`; together, the attack
    stage's key (on disk and in Prefect)."""
    oracle_identity = evals["oracle"].result["identity"] if "oracle" in evals else None
    keys = {label: attack_key(cfg, prepared, label, evals[label].path, None if label == "oracle" else oracle_identity)
            for label in attacked_labels(cfg, evals) if label in evals}
    return {label: cfg.out / "attack" / f"{label}-{key}" for label, key in keys.items()}


def attack(cfg: ExperimentConfig, evals: dict[str, ModelEval], prepared: PreparedData) -> Attacked:
    """Attack every chosen evaluated model and the oracle (see the module docstring); reuse cached results."""
    raise_if(attack_problems(cfg, evals))
    labels = attacked_labels(cfg, evals)
    points = attack_points(cfg)
    dirs = attack_dirs(cfg, prepared, evals)
    todo = [label for label in labels if not (dirs[label] / "attack.json").is_file()]
    relearned = _relearn(cfg, prepared, {label: evals[label].path for label in todo}) if todo else {}
    asked = point_data(cfg, prepared, points) if todo else {}
    results: dict[str, dict[str, Any]] = {}
    for label in labels:
        path = dirs[label] / "attack.json"
        if label in todo:
            oracle = None if label == "oracle" else results["oracle"]
            result = _attack_model(cfg, prepared, evals[label], relearned.get(label, {}), oracle, asked)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".attack.json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, path)
        results[label] = json.loads(path.read_text())
    return Attacked(results, {label: dirs[label] / "attack.json" for label in labels}, points)


def _relearn(cfg: ExperimentConfig, prepared: PreparedData, models: dict[str, Path]) -> dict[str, dict[int, Path]]:
    """label → k → the model relearned k steps (k = 0: the model itself): one fine-tune per model (`relearn_config`:
    its snapshots are the smaller k), all in one start of the ranks."""
    if "relearn" not in cfg.attack.attacks:
        return {}
    out: dict[str, dict[int, Path]] = {label: {0: path} for label, path in models.items()}
    steps = relearn_steps(cfg)
    if not steps:
        return out
    data, _, _ = relearn_data(cfg, prepared)
    run = relearn_config(cfg)
    done = unlearn_many({label: run for label in models}, prepared=data, target=models, summarise=False)
    for label, result in done.items():
        saved = {int(k): Path(v) for k, v in result.summary["snapshots"].items()}
        out[label].update({k: saved[k] for k in steps[:-1]} | {steps[-1]: result.model})
    return out


@dataclass(frozen=True)
class PointData:
    """What one attack point asks, the same for every model: split → rows, the template and length limit they are
    encoded with, and why the point cannot run on this data, or the chance accuracy of a choice format."""

    rows: dict[str, list[dict[str, Any]]]
    template: Any
    max_length: int | None = None  # None: data.max_length
    unavailable: str | None = None
    chance: float | None = None
    rouge: bool = True  # greedy answers to the forget questions (ROUGE); the choice formats are scored without


def point_data(cfg: ExperimentConfig, prepared: PreparedData, points: list[str]) -> dict[str, PointData]:
    """Every point's `PointData`: the data read, split and (for the prompt attacks) encoded once per stage call."""
    data = prepared.splits()
    template = cfg.data.template
    forget = evaluated_rows(data, "forget", cfg)
    # Utility after a weight attack: the retain answers' probability (the sample the evaluation scores, its
    # paraphrased and perturbed answers left out) and the utility sets as the evaluation scores them.
    utility = {s: [one_question(r, "paraphrased_answer", "perturbed_answer") if s == "retain" else r
                   for r in evaluated_rows(data, s, cfg)]
               for s in ("retain", *cfg.eval.utility_splits) if s in data and s in (cfg.eval.splits or data)}
    tokenizer = prepared.tokenizer()
    settings = {"seed": cfg.data_seed, **cfg.attack.context.model_dump()}
    out: dict[str, PointData] = {}
    for point in points:
        kind, _ = point_kind(point)
        if kind == "relearn":
            rows = [one_question(r) for r in data["forget"]]
            _, trained, held_out = relearn_data(cfg, prepared)
            out[point] = PointData({"forget": [rows[i] for i in held_out],
                                    "forget_relearned": [rows[i] for i in trained], **utility}, template)
        elif kind == "quantize":
            out[point] = PointData({"forget": [one_question(r) for r in forget], **utility}, template)
        else:
            entry = PROMPTS.get(kind)
            prompted = entry.fn(forget, template, settings)
            limit = cfg.data.max_length * PROMPT_LENGTH_FACTOR
            out[point] = (PointData({}, template, unavailable=prompted.unavailable) if prompted.unavailable else
                          PointData({"forget": encoded(prompted, tokenizer, limit)}, prompted.template, limit,
                                    chance=prompted.chance, rouge=entry.meta.get("rouge", True)))
    return out


def _load(cfg: ExperimentConfig, path: Path, scheme: str = "none") -> Any:
    if scheme == "none":
        return load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code).to(_device())
    # LLM.int8 warns on every forward that it casts fp32 activations to fp16 (documented in QUANT_SCHEMES).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, device=_device(),
                          quantization=quantization_config(scheme, DTYPES[cfg.model.dtype]))


def _attack_model(cfg: ExperimentConfig, prepared: PreparedData, plain: ModelEval, relearned: dict[int, Path],
                  oracle: dict[str, Any] | None, asked: dict[str, PointData]) -> dict[str, Any]:
    """Every point of one model (`asked`: point → `PointData`): load each attacked model once, probe the point's
    rows, compute the metrics."""
    tokenizer = prepared.tokenizer()
    is_oracle = oracle is None
    out: dict[str, Any] = {}
    timing: dict[str, float] = {}
    loaded: dict[tuple[Path, str], Any] = {}

    def model_of(path: Path, scheme: str = "none") -> Any:
        if (path, scheme) not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[(path, scheme)] = _load(cfg, path, scheme)
        return loaded[(path, scheme)]

    order = sorted(asked, key=lambda p: point_kind(p)[0] in WEIGHT_ATTACKS)  # the prompt attacks share the model
    for point in order:
        start = time.perf_counter()
        data = asked[point]
        if data.unavailable:
            out[point] = {"metrics": {}, "unavailable": {"*": data.unavailable}, "per_example": {}}
            continue
        kind, arg = point_kind(point)
        model = (model_of(relearned[int(arg)]) if kind == "relearn" else model_of(plain.path, arg)
                 if kind == "quantize" else model_of(plain.path))
        generate = [s for s in data.rows if s.startswith("forget")] if cfg.attack.generations and data.rouge else []
        probes = run_probes(model, data.rows, tokenizer, cfg, generations=generate, template=data.template,
                            max_length=data.max_length)
        reference = None if oracle is None else {"per_example": oracle["points"][point]["per_example"]}
        values = compute_metrics(probes, ATTACK_METRICS, oracle=reference, is_oracle=is_oracle,
                                 utility_splits=tuple(cfg.eval.utility_splits))
        metrics = {k: v.value for k, v in values.items()}
        if data.chance is not None:
            metrics["forget_accuracy"] = float(choice_accuracy(probes["forget"].answer,
                                                               probes["forget"].perturbed or []).mean())
            metrics["chance_accuracy"] = data.chance
        if kind not in WEIGHT_ATTACKS:  # the weights are untouched: utility is the plain evaluation's
            metrics.update({k: v for k, v in plain.metrics.items() if k.startswith(("retain_", "model_utility"))
                            or any(k.startswith(f"{s}_") for s in cfg.eval.utility_splits)})
        per_example = values["forget_truth_ratio"].per_example if "forget_truth_ratio" in values else None
        out[point] = {"metrics": metrics, "unavailable": {k: v.reason for k, v in values.items() if v.value is None},
                      "per_example": {"forget_truth_ratio": per_example} if per_example is not None else {},
                      "asked": {s: [r["question"] for r in rows] for s, rows in data.rows.items()
                                if s.startswith("forget")},
                      "generations": {s: p.generation for s, p in probes.items() if p.generation}}
        timing[point] = round(time.perf_counter() - start, 3)
    return {"label": plain.label, "model": str(plain.path), "identity": plain.result["identity"],
            "data_fingerprint": prepared.fingerprint, "oracle": None if oracle is None else oracle["model"],
            "points": {p: out[p] for p in asked}, "relearned": {str(k): str(v) for k, v in relearned.items()},
            "timing": timing, "schemes": {s: QUANT_SCHEMES[s] for s in cfg.attack.quantize.schemes},
            "conventions": CONVENTIONS}


CONVENTIONS = {
    "robust_forget_quality": "forget quality (two-sample KS p-value of per-item forget truth ratios) of the model "
                             "after an attack against the oracle after the same attack",
    "relearn": "fine-tune k steps (method finetune, attack.relearn.lr) on the forget set's people of one half; "
               "forget_* = the other half, forget_relearned_* = the relearned half",
    "quantize": "bitsandbytes through transformers' from_pretrained: every decoder linear layer; embeddings and "
                "LM head unquantized",
    "choice": "options = the (paraphrased) answer among the perturbed answers, listed A, B, ... in the prompt; "
              "accuracy: the true option's summed log-likelihood (EOS excluded) above every wrong one's",
    "cloze": "the fact's statement with the value blanked; answer = the value, options = the wrong values",
    "context": "up to attack.context.facts other facts of the same person (question and answer) before the "
               "question",
    "prefix": "the response begun with attack.context.prefix (prompt, not scored)",
    "utility": "weight attacks: retain probability (answers only: no retain truth ratio) and the utility sets' "
               "probability, truth ratio and accuracy after the attack; prompt attacks: the plain evaluation's "
               "(weights unchanged)",
    "asked": "every attacked item is asked once: its paraphrased question is dropped (the paraphrase attack asks "
             "it); choice and cloze are scored by likelihood only (no greedy answers, no ROUGE)",
}
