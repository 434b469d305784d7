"""Typed stage functions: the one entry point of each pipeline stage for the CLI, Prefect and tests.

Each stage takes its upstream stages' results as arguments and has one key function, which names its output
on disk and is the Prefect task's cache key too: `prepare_key(cfg)`, `build_key(cfg, prepared)`,
`run_key(cfg, target, prepared)` (one unlearning run), `merge_key(cfg, prepared, built)`,
`eval_dir(cfg, label, path, prepared, oracle)` (one evaluation) and `attack_key`. What the evaluation scores
(eval.models' roles, resolved through their stages) is decided here, once, for `unlearn eval` and the flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from unlearning.attack import Attacked, attack, attack_dirs, attack_key, attacked_labels
from unlearning.attack import preflight_problems as attack_preflight
from unlearning.checkpoints import checkpoint_dir
from unlearning.config import method_runs, trained_runs
from unlearning.data.prepare import PreparedData, prepare, prepare_key
from unlearning.errors import UserError, raise_if
from unlearning.evaluate.runner import ModelEval, checkpoint_problems, eval_dir, evaluate_model
from unlearning.evaluate.subject import Subject
from unlearning.evaluate.suites import get_suite
from unlearning.merge.stage import FINETUNE_JOB, Merged, finetune_config, merge, merge_key, training_jobs
from unlearning.methods import in_context
from unlearning.models import BuiltModels, build_key, build_models
from unlearning.schema import ExperimentConfig
from unlearning.unlearn import Unlearned, data_problems, launch_problems, run_key, unlearn, unlearn_many

__all__ = [
    "FINETUNE_JOB", "Attacked", "BuiltModels", "Merged", "ModelEval", "PreparedData", "Subject", "Unlearned", "attack",
    "attack_dirs", "attack_key", "attacked_labels", "build_key", "build_models", "eval_dir", "eval_roles",
    "eval_subjects", "evaluate", "evaluate_all", "evaluate_model", "merge", "merge_key", "preflight", "prepare",
    "prepare_key", "run_key", "run_models", "training_jobs", "unlearn", "unlearn_many",
]


def eval_roles(cfg: ExperimentConfig) -> set[str]:
    """The roles eval.models names (target, oracle, unlearned, merged), which decide the stages that run."""
    return {entry for entry in cfg.eval.models if "=" not in entry}


def given_checkpoints(cfg: ExperimentConfig) -> dict[str, Path]:
    """Label → checkpoint directory of each LABEL=PATH in eval.models (a GGUF file: its converted checkpoint)."""
    return {label: Path(checkpoint_dir(path)) for label, sep, path in (m.partition("=") for m in cfg.eval.models)
            if sep}


def run_models(label: str, done: Unlearned, cfg: ExperimentConfig) -> dict[str, Path]:
    """Label → checkpoint of what one unlearning run contributes to the evaluation: its snapshots
    (`<label>@step<N>`, with train.snapshot_every and eval.snapshots), then its final model."""
    steps = done.summary.get("snapshots", {}) if cfg.eval.snapshots else {}
    return {**{f"{label}@step{step}": Path(path) for step, path in steps.items()}, label: done.model}


def eval_subjects(cfg: ExperimentConfig, built: BuiltModels | None, trained: Mapping[str, Unlearned],
                  merged: Merged | None, extra: Mapping[str, Path] | None = None) -> dict[str, Subject]:
    """Label → subject of every model the evaluation scores, in eval.models order with the roles expanded
    (target and oracle from `built`; `unlearned`: each method run of `trained` (label → run), its snapshots then
    its final model, and each in-context method on the target; `merged`: one model per λ, merged_l<λ>), then
    any `extra` labels."""
    roles = eval_roles(cfg)
    subjects = {label: Subject(path) for label, path in {**given_checkpoints(cfg), **(extra or {})}.items()}
    if built is not None:
        subjects.update({role: Subject(Path(getattr(built, role))) for role in ("target", "oracle") if role in roles})
    expanded: dict[str, list[str]] = {}
    if "unlearned" in roles:
        expanded["unlearned"] = []
        for label, run in method_runs(cfg).items():
            if in_context(run.method):
                assert built is not None, "the unlearned role builds the target"
                models = {label: Subject(Path(built.target), run.method, run.seed)}
            else:
                models = {name: Subject(path) for name, path in run_models(label, trained[label], cfg).items()}
            subjects.update(models)
            expanded["unlearned"] += list(models)
    if "merged" in roles and merged is not None:
        expanded["merged"] = [Merged.label(lam) for lam in merged.models]
        subjects.update({Merged.label(lam): Subject(p) for lam, p in merged.models.items()})
    order = [x for entry in cfg.eval.models for x in expanded.get(entry.partition("=")[0], [entry.partition("=")[0]])]
    order += [k for k in extra or {} if k not in order]
    return {label: subjects[label] for label in order}


def evaluate_all(subjects: Mapping[str, Subject],
                 evaluate_one: Callable[[str, Subject, ModelEval | None], ModelEval]) -> dict[str, ModelEval]:
    """`evaluate_one(label, subject, oracle)` for every subject, the oracle first (the others' reference); the
    results in the subjects' order."""
    results: dict[str, ModelEval] = {}
    if "oracle" in subjects:
        results["oracle"] = evaluate_one("oracle", subjects["oracle"], None)
    for label, subject in subjects.items():
        if label not in results:
            results[label] = evaluate_one(label, subject, results.get("oracle"))
    return {label: results[label] for label in subjects}


def evaluate(cfg: ExperimentConfig, extra: dict[str, Path] | None = None) -> dict[str, ModelEval]:
    """The eval stage of `unlearn eval`: evaluate `eval.models` (plus `extra` label → checkpoint), the oracle
    first, each role through its stage (built, trained or merged, or found cached): every training job in one
    start of the ranks. Every given checkpoint is checked before anything is loaded."""
    get_suite(cfg.eval.suite)
    prepared = prepare(cfg)
    raise_if(checkpoint_problems(cfg, prepared))
    roles = eval_roles(cfg)
    built = build_models(cfg, prepared) if roles else None
    jobs = training_jobs(cfg, trained_runs(cfg) if "unlearned" in roles else {}, "merged" in roles)
    trained = unlearn_many(jobs, prepared=prepared, built=built) if jobs else {}
    merged = merge(cfg, prepared=prepared, built=built, finetuned=trained.get(FINETUNE_JOB)) \
        if "merged" in roles else None
    subjects = eval_subjects(cfg, built, trained, merged, extra)
    if not subjects:
        raise UserError("eval.models is empty; list roles (target, oracle, unlearned) or LABEL=PATH checkpoints")
    return evaluate_all(subjects, lambda label, subject, oracle: evaluate_model(
        subject, prepared, cfg, label=label, oracle=oracle, is_oracle=label == "oracle"))


def preflight(cfg: ExperimentConfig, prepared: PreparedData) -> list[str]:
    """Every problem the later stages would raise about this config and data, found before any model is built:
    each method run's launch and data checks, the merge fine-tune's, the eval checkpoints and splits."""
    problems: list[str] = []
    roles = eval_roles(cfg)
    runs = [*trained_runs(cfg).items()] if "unlearned" in roles else []
    if "merged" in roles:
        runs.append(("merge.finetune", finetune_config(cfg)))
    for label, run in runs:
        where = "" if label == "unlearned" else f"{label}: "
        problems += [where + p for p in launch_problems(run) + data_problems(run, prepared)]
    problems += checkpoint_problems(cfg, prepared)
    text = "forget" in prepared.info().get("documents", {})
    if text and "unlearned" in roles and (context := [label for label, run in method_runs(cfg).items()
                                                      if in_context(run.method)]):
        problems.append(f"{', '.join(context)}: an in-context method puts forget items with other answers before each "
                        "question, and the forget split is text, which has no questions or answers")
    if text and cfg.attack.attacks:
        problems.append("the attack stage asks the forget set's questions in other forms, and the forget split is "
                        "text; set attack.attacks: [] (VerbMem and KnowMem measure a text benchmark)")
    elif cfg.attack.attacks:
        problems += attack_preflight(cfg, prepared)
    return list(dict.fromkeys(problems))
