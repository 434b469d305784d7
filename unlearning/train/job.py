"""One rank of an unlearning job, started by the launcher as `python -m unlearning.train SPEC.json`.

The spec (written by `unlearning.unlearn`) names the resolved config, the target checkpoint, the
prepared data and the run directory. Every rank builds the model and the DeepSpeed engine, resumes from
the newest checkpoint when one exists, reads or computes the reference log-probs, and runs the shared
loop; rank 0 then consolidates the weights into a plain HF checkpoint and writes `run_summary.json`
(last, so its presence marks a finished run). A NaN/inf loss stops every rank and keeps the last good
checkpoint; any failure leaves `failure.json` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Libraries the job needs anyway, imported before its baseline memory is measured (`rss_before_model_mb`),
# so that the reported training memory holds model, optimizer, activations and data, not module imports.
# The model's own module, which transformers imports only when it builds one, follows in `run`.
import datasets  # noqa: F401
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM  # noqa: F401

from unlearning.config import validate_config
from unlearning.data.pairing import refusal_rows
from unlearning.data.prepare import PreparedData
from unlearning.data.tokenize import encode_qa_many
from unlearning.memory import peak_rss_mb, rss_mb
from unlearning.methods import METHODS
from unlearning.methods.answers import layouts
from unlearning.schema import ExperimentConfig, LoraConfig, MethodConfig
from unlearning.train import engine as ds
from unlearning.train.complete import step_of
from unlearning.train.loop import LoopResult, run_loop
from unlearning.train.objective import Reference, UnlearningObjective, needs
from unlearning.train.reference import reference_logprobs
from unlearning.train.sampler import Layout, Stream, micro_batches
from unlearning.train.stopping import StopRuleError, StopRules

KILL_ENV = "UNLEARN_FAULT_KILL"  # "RANK:STEP": that rank SIGKILLs itself as step STEP's checkpoint begins
EXIT_ENV = "UNLEARN_FAULT_ABORT_AT_EXIT"  # "RANK": that rank aborts after its job's summary (a native crash)
FAILED_EXIT = 3


class JobError(RuntimeError):
    """A problem found inside the job (e.g. a stopping rule that cannot hold); written to failure.json."""


@dataclass
class JobOutput:
    engine: Any
    result: LoopResult
    summary: dict[str, Any]
    zero3_handle: Any = None


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap `model` with trainable LoRA adapters on `lora.target_modules` (the base stays frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def live_reference(cfg: ExperimentConfig, engine: Any, target: str, ds_config: dict[str, Any]) -> Reference:
    """The live reference model: the adapter switched off under LoRA, else a frozen copy of the target."""
    if cfg.train.lora.enabled:
        return Reference(engine.module, engine.module.disable_adapter)
    return Reference(ds.frozen_reference(target, ds_config, dtype=torch.float32,
                                         trust_remote_code=cfg.model.trust_remote_code))


def select_trainable(model: Any, method: MethodConfig) -> int:
    """Freeze every parameter that the method's `trains` regexes (full match) leave out; returns how many
    parameter tensors train. Methods without `trains` train all of them (or the LoRA adapters)."""
    key = METHODS.get(method.name).meta.get("trains")
    if key is None:
        return sum(1 for p in model.parameters() if p.requires_grad)
    patterns = [re.compile(x) for x in method.params[key]]
    chosen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(p.fullmatch(name) for p in patterns))
        chosen += int(param.requires_grad)
    if not chosen:
        raise JobError(f"method.{key}: {method.params[key]} match no parameter of the model")
    return chosen


def _streams(cfg: ExperimentConfig, engine: Any, splits: Any, tok: Any, need: dict[str, bool],
             ref_cache: str | None, resumed: bool, alternatives: str | None = None, constants: str | None = None,
             ) -> dict[str, Stream]:
    rows = {"forget": list(splits["forget"])}
    if need["idk"]:
        rows["idk"] = refusal_rows(tok, cfg.data.template, rows["forget"], seed=cfg.seed,
                                   max_length=cfg.data.max_length)
    if need["alt"]:  # written by the parent before the launch (unlearn.write_alternatives)
        if alternatives is None:
            raise JobError(f"method {cfg.method.name!r} reads alternative answers but the job has no file of them")
        written = json.loads(Path(alternatives).read_text())["alternatives"]
        rows["alt"] = encode_qa_many(tok, cfg.data.template, [(a["question"], a["alternate"]) for a in written],
                                     cfg.data.max_length)
    extra: dict[str, dict[str, torch.Tensor]] = {name: {} for name in rows}
    if need["ref_logp"]:
        if ref_cache is None:
            raise JobError(f"method {cfg.method.name!r} needs reference log-probs but the job has no cache path")
        if resumed and not Path(ref_cache).is_file():
            raise JobError(f"resuming needs the reference log-probs cached at {ref_cache}, which is gone; "
                           "delete the run's checkpoints/ to start over")
        ref = reference_logprobs(engine.module, rows, Path(ref_cache), pad_id=tok.pad_token_id,
                                 batch_size=cfg.eval.batch_size)
        extra = {name: {"ref_logp": values} for name, values in ref.items()}
    if need["const"]:  # written by the parent before the launch (unlearn.write_constants)
        if constants is None or not Path(constants).is_file():
            raise JobError(f"method {cfg.method.name!r} reads per-item constants, and the job has no file of them")
        from safetensors.torch import load_file

        values = load_file(constants)["const"]
        if len(values) != len(rows["forget"]):
            raise JobError(f"{constants} holds {len(values)} constants for {len(rows['forget'])} forget items")
        extra["forget"]["const"] = values
    streams = {name: Stream(r, name, extra[name]) for name, r in rows.items()}
    if need["retain"]:
        streams["retain"] = Stream(list(splits["retain"]), "retain")
    return streams


def export_model(cfg: ExperimentConfig, ckpt_dir: Path, tag: str, target: str, tokenizer: Any, model_dir: Path,
                 adapter_dir: Path | None = None) -> dict[str, str]:
    """Consolidate checkpoint `tag` into `model_dir` (merged HF safetensors) and, with LoRA and an
    `adapter_dir`, the adapter there. Written to temporary siblings and renamed into place."""
    from unlearning.models import DTYPES, load_causal_lm

    state = ds.consolidated_state_dict(ckpt_dir, tag, cfg.train.zero_stage)
    with ds.plain_loading():
        model = load_causal_lm(target, "float32", cfg.model.trust_remote_code)
    if cfg.train.lora.enabled:
        torch.manual_seed(cfg.seed)
        model = apply_lora(model, cfg.train.lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for k, p in model.named_parameters() if k in state}
    untouched = [k for k, p in model.named_parameters() if k in missing and p.requires_grad
                 and p.data_ptr() not in loaded]
    if unexpected or untouched:
        raise JobError(f"checkpoint {ckpt_dir / tag} does not match the model: unexpected {unexpected[:5]}, "
                       f"missing trainable {untouched[:5]}")
    paths = {}
    staged = []
    if cfg.train.lora.enabled:
        if adapter_dir is not None:
            adapter_tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            model.save_pretrained(str(adapter_tmp))
            staged.append((adapter_tmp, adapter_dir))
            paths["adapter"] = str(adapter_dir)
        model = model.merge_and_unload()
    model_tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(model_tmp, ignore_errors=True)
    model.to(DTYPES[cfg.model.dtype]).save_pretrained(str(model_tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(model_tmp))
    staged.append((model_tmp, model_dir))
    for tmp, final in staged:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    paths["model"] = str(model_dir)
    return paths


def snapshots(run_dir: Path) -> dict[int, str]:
    """Step → the HF model saved at that step (`train.snapshot_every`, `train.snapshot_steps`), in step order."""
    found = [p for p in (run_dir / "snapshots").glob("step*") if p.is_dir() and step_of(p.name) >= 0]
    return {step_of(p.name): str(p) for p in sorted(found, key=lambda p: step_of(p.name))}


def _peak_memory_mb(device: torch.device, rss_start_mb: float, train_peak_mb: float) -> dict[str, float]:
    """Memory of the job, each the max over ranks: peak resident memory of the whole job and of the
    training loop alone (before the final checkpoint is serialised), the resident memory before the
    model was loaded (the libraries), and on GPUs the peak allocated device memory."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    values = torch.tensor([peak_rss_mb(), train_peak_mb, rss_start_mb, gpu], dtype=torch.float64).to(device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    out = {"peak_rss_mb": round(float(values[0]), 1), "train_peak_rss_mb": round(float(values[1]), 1),
           "rss_before_model_mb": round(float(values[2]), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(float(values[3]), 1)
    return out


def record_failure(run_dir: Path, error: str, *, expected: bool = False, resumable: bool = True) -> None:
    """Leave `failure.json`: the first failing rank's reason, the checkpoint to resume from, whether the failure
    was an expected one whose message says what to change (a rerun as it is cannot help), and whether resuming
    with the same settings can help at all (not after a non-finite loss or a collapse, which the same lr
    reproduces)."""
    path = run_dir / "failure.json"
    if not path.exists():
        _write_json(path, {"error": error, "last_checkpoint": ds.latest_tag(run_dir / "checkpoints"),
                           "expected": expected, "resumable": resumable})


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def run(spec: dict[str, Any]) -> JobOutput:
    """Run this rank's share of the job described by `spec` (see the module docstring)."""
    start = time.perf_counter()
    cfg = validate_config(spec["config"])
    train, run_dir = cfg.train, Path(spec["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    place = ds.init_distributed()
    ds.import_model_code(spec["target"], trust_remote_code=cfg.model.trust_remote_code)
    rss_start_mb = rss_mb()  # the libraries, now (not the peak: import spikes must not hide what training adds)
    torch.manual_seed(cfg.seed)  # LoRA's initialisation, identical on every rank

    ds_config = ds.deepspeed_config(train, place.world)
    # The handle must outlive the engine: it tells transformers that ZeRO-3 partitions this model.
    model, zero3_handle = ds.load_for_training(spec["target"], ds_config, trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if train.lora.enabled:
        model = apply_lora(model, train.lora)
    else:
        select_trainable(model, cfg.method)
    engine = ds.initialize(model, ds_config, total_steps=train.max_steps, warmup_ratio=train.warmup_ratio,
                           schedule=train.schedule)
    state = ds.load_latest(engine, ckpt_dir) or {}
    start_step = int(state.get("step", 0))
    history: list[dict[str, float]] = list(state.get("history", []))

    prepared = PreparedData(Path(spec["data"]), spec["data_fingerprint"])
    splits, tok, need = prepared.splits(), prepared.tokenizer(), needs(cfg.method)
    streams = _streams(cfg, engine, splits, tok, need, spec.get("ref_cache"), resumed=start_step > 0,
                       alternatives=spec.get("alternatives"), constants=spec.get("constants"))
    reference = live_reference(cfg, engine, spec["target"], ds_config) if need["ref_model"] else None
    aux = None
    if need["aux_model"]:
        if not spec.get("aux"):
            raise JobError(f"method {cfg.method.name!r} reads its auxiliary model, and the job names none")
        aux = Reference(ds.frozen_reference(spec["aux"], ds_config, dtype=torch.float32,
                                            trust_remote_code=cfg.model.trust_remote_code))
    ways = layouts(engine)  # probed now, on every rank (a collective forward under ZeRO-3)
    for other in (reference, aux):
        if other is not None:
            layouts(other.model)
    objective = UnlearningObjective(cfg.method, reference, pack=train.packing, aux=aux)
    layout = Layout(train.batch_size, place.world, train.grad_accum)
    steps_per_epoch = max(1, len(streams["forget"]) // layout.global_batch)
    objective.resume(history, steps_per_epoch)
    batches = micro_batches(streams, layout, rank=place.rank, seed=cfg.seed, pad_id=tok.pad_token_id,
                            start_step=start_step, paired={s: "forget" for s in ("idk", "alt") if s in streams})

    rules = StopRules(train.stop, engine.module, splits, tokenizer=tok, template=cfg.data.template,
                      max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size, seed=cfg.seed, state=state)
    if start_step == 0:
        try:
            rules.start()
        except StopRuleError as e:
            raise JobError(str(e)) from e
    saved = {"step": start_step}
    kill_at = tuple(int(x) for x in os.environ[KILL_ENV].split(":")) if os.environ.get(KILL_ENV) else None

    def client_state(step: int) -> dict[str, Any]:
        return {"step": step, "history": history, **rules.state()}

    def on_step(record: dict[str, float]) -> str | None:
        step = int(record["step"])
        history.append(record)
        objective.after_step(record, epoch=step / steps_per_epoch)
        try:
            reason = rules.after(record)
        except StopRuleError as e:
            raise JobError(str(e)) from e
        due = (bool(train.snapshot_every) and step % train.snapshot_every == 0) or step in train.snapshot_steps
        snapshot = due and not reason and step < train.max_steps  # the run's last step is its model/
        if snapshot or (train.checkpoint_every and step % train.checkpoint_every == 0):
            if kill_at == (place.rank, step):
                os.kill(os.getpid(), signal.SIGKILL)
            ds.save_checkpoint(engine, ckpt_dir, step, client_state(step), frozen=not train.lora.enabled,
                               keep=train.keep_checkpoints)
            saved["step"] = step
        if snapshot:
            if place.rank == 0:
                export_model(cfg, ckpt_dir, f"step{step}", spec["target"], tok, run_dir / "snapshots" / f"step{step}")
            dist.barrier()
        return reason

    result = run_loop(engine, batches, objective, max_steps=train.max_steps, grad_accum=train.grad_accum,
                      desc=f"unlearn {cfg.method.name}", start_step=start_step, on_step=on_step)
    train_peak_mb = peak_rss_mb()
    if saved["step"] != result.steps or ds.latest_tag(ckpt_dir) is None:
        ds.save_checkpoint(engine, ckpt_dir, result.steps, client_state(result.steps),
                           frozen=not train.lora.enabled, keep=train.keep_checkpoints)
    tokens = torch.tensor([result.tokens], dtype=torch.float64, device=place.device)
    dist.all_reduce(tokens)
    memory = _peak_memory_mb(place.device, rss_start_mb, train_peak_mb)

    summary: dict[str, Any] = {}
    if place.rank == 0:
        paths = export_model(cfg, ckpt_dir, f"step{result.steps}", spec["target"], tok, run_dir / "model",
                             run_dir / "adapter")
        summary = {
            "method": cfg.method.model_dump(), "target": spec["target"], "data_fingerprint": prepared.fingerprint,
            **paths, "steps": result.steps, "max_steps": train.max_steps, "stopped_by": result.stopped_by,
            "resumed_from_step": start_step, "world_size": place.world, "zero_stage": train.zero_stage,
            "lora": train.lora.enabled, "global_batch": layout.global_batch,
            "answer_logits_only": ways.keep, "packing": train.packing and ways.pack,
            "snapshots": snapshots(run_dir),
            "losses": history, "utility_checks": rules.utility, "holdout_checks": rules.holdout,
            "final": history[-1] if history else {},
            "tokens": int(tokens.item()), "train_s": round(result.wall_s, 3),
            "tokens_per_s": round(float(tokens.item()) / result.wall_s, 1) if result.wall_s else 0.0,
            **memory, "wall_s": round(time.perf_counter() - start, 2),
            "reference_cache": spec.get("ref_cache") if need["ref_logp"] else None,
        }
        _write_json(run_dir / "run_summary.json", summary)
        (run_dir / "failure.json").unlink(missing_ok=True)  # an earlier attempt's reason, now stale
    dist.barrier()
    return JobOutput(engine, result, summary, zero3_handle)

