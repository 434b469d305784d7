"""The merge stage: fine-tune the target on the forget set, then negate that task vector over a λ sweep.

τ = θ_ft − θ_target, with θ_ft the target fine-tuned further on the forget set by the training engine
(method `finetune`: descent on the forget NLL, run and cached like any unlearning run; with
`merge.finetune.lora` a LoRA adapter, whose scale·B·A is the task vector). Each λ in `merge.lambdas`
gives θ_target − λ·τ under `<output_dir>/merge/<method>-l<λ>-<hash>/model`, streamed by
`merge_checkpoints`, plus the forget/retain answer probabilities of every merged model in
`<output_dir>/merge/summary.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.data.prepare import PreparedData, prepare
from unlearning.hashing import content_hash
from unlearning.merge.streaming import MERGES, merge_checkpoints
from unlearning.models import BuiltModels, build_models, model_identity, probabilities
from unlearning.outputs import write_atomic
from unlearning.schema import ExperimentConfig
from unlearning.unlearn import Unlearned, forget_finetune, run_key, unlearn

MERGE_VERSION = 1


@dataclass(frozen=True)
class Merged:
    """The merged checkpoints (λ → directory), the task vector's source, and the stage summary."""

    models: dict[float, Path]
    task: Path
    summary: dict[str, Any]

    @staticmethod
    def label(lam: float) -> str:
        return f"merged_l{lam:g}"


def finetune_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment config of the forget fine-tune: `train` with the merge's lr/steps, no stop rules."""
    ft = cfg.merge.finetune
    return forget_finetune(cfg, lr=ft.lr, max_steps=ft.max_steps, lora=ft.lora)


FINETUNE_JOB = "(merge.finetune)"  # its label among training jobs: no method label can take this form


def training_jobs(cfg: ExperimentConfig, runs: dict[str, ExperimentConfig], merged: bool
                  ) -> dict[str, ExperimentConfig]:
    """Every training job of a config's evaluation: the method runs that train (`config.trained_runs`), and the
    merge's forget fine-tune when merged models are evaluated (so that one start of the ranks trains them all)."""
    return {**runs, **({FINETUNE_JOB: finetune_config(cfg)} if merged else {})}


def merged_key(cfg: ExperimentConfig, prepared: PreparedData, target: Path, lam: float) -> str:
    """Everything one merged model depends on: the forget fine-tune's run key (its target, data and recipe, so
    the task vector), the merge and λ. The name of its directory."""
    return content_hash(MERGE_VERSION, run_key(finetune_config(cfg), str(target), prepared), cfg.merge.method, lam)


def merge_key(cfg: ExperimentConfig, prepared: PreparedData, built: BuiltModels) -> str:
    """The merge stage's key: every merged model's."""
    return content_hash([merged_key(cfg, prepared, built.target, lam) for lam in cfg.merge.lambdas])


def merge(cfg: ExperimentConfig, *, prepared: PreparedData | None = None, built: BuiltModels | None = None,
          finetuned: Unlearned | None = None) -> Merged:
    """Build or reuse θ_ft and one negated model per λ; reuse merged models already written.

    The inputs are the upstream stages' results: the prepared data, the built target and the forget fine-tune
    (`finetune_config`, trained with the unlearning runs); each by default computed, or found cached."""
    MERGES.get(cfg.merge.method)
    prepared = prepared or prepare(cfg)
    built = built or build_models(cfg, prepared)
    ft = finetuned or unlearn(finetune_config(cfg), prepared=prepared, built=built)
    task = ft.run_dir / "adapter" if cfg.merge.finetune.lora else ft.model
    models, runs = {}, []
    for lam in cfg.merge.lambdas:
        key = merged_key(cfg, prepared, built.target, lam)
        out = cfg.out / "merge" / f"{cfg.merge.method}-l{lam:g}-{key}" / "model"
        cached = (out / "merge.json").is_file()
        start = time.perf_counter()
        if not cached:
            out.parent.mkdir(parents=True, exist_ok=True)
            merge_checkpoints(built.target, [(task, -lam)], out, method=cfg.merge.method,
                              chunk_bytes=cfg.merge.chunk_mb << 20, max_shard_bytes=cfg.merge.shard_size_mb << 20)
        models[lam] = out
        runs.append({"lambda": lam, "model": str(out), "cached": cached,
                     "merge_s": round(time.perf_counter() - start, 2)})
    summary = _summary(cfg, prepared, built, ft, task, runs)
    return Merged(models, task, summary)


def _summary(cfg: ExperimentConfig, prepared: PreparedData, built: BuiltModels, ft: Unlearned, task: Path,
             runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer probabilities per split of the target, θ_ft and each merged model (reused when unchanged)."""
    path = cfg.out / "merge" / "summary.json"
    last = json.loads(path.read_text()) if path.is_file() else {}
    known = last.get("probability_by_identity", {})
    entries = {"target": built.target, "finetuned": ft.model,
               **{Merged.label(r["lambda"]): Path(r["model"]) for r in runs}}
    probs, by_identity = {}, {}
    for label, model in entries.items():
        ident = model_identity(model)
        by_identity[ident] = known.get(ident) or probabilities(model, prepared, cfg)
        probs[label] = by_identity[ident]
    summary = {"method": cfg.merge.method, "task_vector": str(task), "finetune_run": str(ft.run_dir),
               "merged": runs, "probability": probs, "probability_by_identity": by_identity}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(summary, indent=2))
    return summary
