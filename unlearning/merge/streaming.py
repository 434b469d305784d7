"""Task arithmetic over checkpoints, streamed tensor by tensor and row chunk by row chunk.

`merge_checkpoints(base, tasks, out)` writes base + Σ wᵢ·τᵢ with τᵢ = θᵢ − base for a dense checkpoint,
or τᵢ = scale·B·A for a LoRA adapter (peft's layout; scale = lora_alpha / r, or / √r with rsLoRA). The
tensor function is a registered merge (`MERGES`); this module only streams. Memory stays near a few row
chunks (`chunk_bytes`), not the model: inputs are read with positioned reads, outputs appended to
safetensors shards whose headers are laid out in advance. Integer and boolean tensors (buffers) are
copied from the base; dtypes are preserved (the arithmetic runs in float32). Every input is checked
before anything is written, and the output directory appears only once complete (written beside it,
then renamed).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearning.errors import UserError
from unlearning.merge.safetensors_io import (
    Planned,
    TensorInfo,
    checkpoint_tensors,
    read_header,
    read_rows,
    row_chunks,
    write_shards,
)
from unlearning.outputs import publish
from unlearning.registry import Registry

MERGES = Registry("merge")
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
SKIP_FILES = {".safetensors", ".bin", ".pt"}


@MERGES.register("task_arithmetic")
def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor | None], weights: Sequence[float],
                    out: torch.Tensor) -> torch.Tensor:
    """base + Σ wᵢ·τᵢ (Ilharco et al. 2023, "Editing models with task arithmetic"), written into `out`.

    Negation is w = −λ, addition w > 0, interpolation from base toward θ is w ∈ [0, 1]. All tensors
    float32 and the same shape; a None delta (a LoRA adapter that does not touch this tensor) adds nothing.
    """
    out.copy_(base)
    for w, d in zip(weights, deltas, strict=True):
        if d is not None and w != 0:
            out.add_(d, alpha=w)
    return out


class _Work:
    """Open read handles and scratch buffers, reused from chunk to chunk.

    Allocating fresh chunk-sized buffers for every chunk makes glibc serve them from its heap, whose
    freed pages it keeps, and the resident size creeps up to several times the largest tensor; reusing
    a fixed set keeps the merge at a few chunks.
    """

    def __init__(self) -> None:
        self._open: dict[Path, io.BufferedReader] = {}
        self._bytes: dict[str, bytearray] = {}
        self._float: dict[str, torch.Tensor] = {}

    def rows(self, info: TensorInfo, start: int, stop: int, slot: str) -> torch.Tensor:
        """Rows of a tensor in the reusable byte buffer `slot` (valid until that slot is read again)."""
        if info.file not in self._open:
            self._open[info.file] = info.file.open("rb")
        n = (stop - start) * info.row_bytes
        if len(self._bytes.get(slot, b"")) < n:
            self._bytes[slot] = bytearray(n)
        return read_rows(info, start, stop, self._open[info.file], self._bytes[slot])

    def floats(self, shape: torch.Size | tuple[int, ...], slot: str) -> torch.Tensor:
        """An uninitialised float32 tensor of `shape` in the reusable buffer `slot`."""
        n = math.prod(shape)
        if slot not in self._float or self._float[slot].numel() < n:
            self._float[slot] = torch.empty(n, dtype=torch.float32)
        return self._float[slot][:n].view(shape)

    def as_float(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        return rows if rows.dtype == torch.float32 else self.floats(rows.shape, slot).copy_(rows)

    def cast(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`values` cast to `dtype`, in a reusable buffer."""
        n = values.numel() * dtype.itemsize
        if len(self._bytes.get("cast", b"")) < n:
            self._bytes["cast"] = bytearray(n)
        flat = torch.frombuffer(self._bytes["cast"], dtype=torch.uint8, count=n).view(dtype)
        return flat.view(values.shape).copy_(values)

    def close(self) -> None:
        for f in self._open.values():
            f.close()


@dataclass
class DenseTask:
    """A full checkpoint θ; its task vector is θ − base."""

    path: Path
    tensors: dict[str, TensorInfo]

    def delta(self, work: _Work, name: str, base_rows: torch.Tensor, start: int, stop: int, slot: str
              ) -> torch.Tensor:
        rows = work.as_float(work.rows(self.tensors[name], start, stop, slot), f"{slot}.f")
        return torch.sub(rows, base_rows, out=work.floats(base_rows.shape, f"{slot}.delta"))


@dataclass
class LoraTask:
    """A peft LoRA adapter; its task vector on a base weight W (out, in) is scale·B·A, B (out, r), A (r, in)."""

    path: Path
    scale: float
    pairs: dict[str, tuple[TensorInfo, TensorInfo]] = field(default_factory=dict)  # base name -> (A, B)

    def delta(self, work: _Work, name: str, base_rows: torch.Tensor, start: int, stop: int, slot: str
              ) -> torch.Tensor | None:
        if name not in self.pairs:
            return None
        a, b = self.pairs[name]
        a_rows = work.as_float(work.rows(a, 0, a.rows, f"{slot}.a"), f"{slot}.a.f")
        b_rows = work.as_float(work.rows(b, start, stop, f"{slot}.b"), f"{slot}.b.f")
        delta = torch.matmul(b_rows, a_rows, out=work.floats(base_rows.shape, f"{slot}.delta"))
        return delta.mul_(self.scale)


def _arch(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path}: no config.json; point at a saved model directory")
    raw = json.loads(config.read_text())
    text = raw.get("text_config", {}) if isinstance(raw.get("text_config"), dict) else {}
    return {k: raw.get(k, text.get(k)) for k in ARCH_KEYS}


def open_task(path: Path, base: dict[str, TensorInfo], base_path: Path) -> tuple[DenseTask | LoraTask, list[str]]:
    """A task checkpoint (dense model or LoRA adapter) and every problem matching it against the base."""
    if (path / "adapter_config.json").is_file():
        return _open_lora(path, base)
    problems = []
    arch, base_arch = _arch(path), _arch(base_path)
    differ = {k: (base_arch[k], arch[k]) for k in ARCH_KEYS if arch[k] != base_arch[k]}
    if differ:
        problems.append(f"{path}: a different architecture from the base {base_path}: "
                        + ", ".join(f"{k} {b!r} vs {t!r}" for k, (b, t) in differ.items()))
        return DenseTask(path, {}), problems
    try:
        tensors = checkpoint_tensors(path)
    except FileNotFoundError as e:
        return DenseTask(path, {}), [f"{path}: {e}; the merge reads safetensors checkpoints only"]
    for name in sorted(set(base) - set(tensors)):
        problems.append(f"{path}: tensor {name} is missing (the base has it, shape {list(base[name].shape)})")
    for name in sorted(set(tensors) - set(base)):
        problems.append(f"{path}: tensor {name} is not in the base {base_path} (tied weights saved untied?)")
    for name in sorted(set(tensors) & set(base)):
        t, b = tensors[name], base[name]
        if t.shape != b.shape:
            problems.append(f"{path}: tensor {name} has shape {list(t.shape)}, the base {list(b.shape)}")
        elif t.dtype != b.dtype:
            problems.append(f"{path}: tensor {name} has dtype {t.dtype}, the base {b.dtype}; save both in one dtype")
    return DenseTask(path, tensors), problems


def _open_lora(path: Path, base: dict[str, TensorInfo]) -> tuple[LoraTask, list[str]]:
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    task, problems = LoraTask(path, scale), []
    if cfg.get("fan_in_fan_out"):
        problems.append(f"{path}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported")
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return task, [*problems, f"{path}: no adapter_model.safetensors (the merge reads safetensors adapters only)"]
    tensors = read_header(file)
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            problems.append(f"{path}: {key} has no matching lora_B tensor")
        elif name not in base:
            problems.append(f"{path}: adapter weight {key} targets {name}, which the base does not have")
        elif (b.shape[0], a.shape[1]) != base[name].shape:
            problems.append(f"{path}: {key}: B·A has shape {[b.shape[0], a.shape[1]]}, the base {name} "
                            f"{list(base[name].shape)}")
        else:
            task.pairs[name] = (a, b)
    unsupported = [k for k in tensors if "lora_embedding" in k or "lora_magnitude" in k]
    if unsupported:
        problems.append(f"{path}: embedding LoRA / DoRA tensors ({unsupported[0]}, …) are not supported")
    if not task.pairs and not problems:
        problems.append(f"{path}: the adapter holds no lora_A/lora_B pairs")
    return task, problems


def _copy_side_files(base: Path, out: Path) -> None:
    """config, generation config and tokenizer files of the base, so the output loads on its own."""
    for f in base.iterdir():
        if f.is_file() and f.suffix not in SKIP_FILES and f.name not in ("model.safetensors.index.json",
                                                                             "build.json", "merge.json"):
            shutil.copy2(f, out / f.name)


def merge_checkpoints(base: Path, tasks: Sequence[tuple[Path, float]], out: Path, *, method: str = "task_arithmetic",
                      chunk_bytes: int = 64 << 20, max_shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """Write `method`(base, task vectors, weights) to `out` (a sharded HF checkpoint); returns its provenance.

    Raises:
        UserError: listing every problem with the inputs (missing tensors, shape/dtype mismatches,
            another architecture), before anything is written.
    """
    fn = MERGES.get(method).fn
    base_tensors = checkpoint_tensors(base)
    opened, problems = [], []
    for path, _ in tasks:
        task, task_problems = open_task(Path(path), base_tensors, base)
        opened.append(task)
        problems += task_problems
    if problems:
        raise UserError(problems)
    weights = [w for _, w in tasks]
    order = sorted(base_tensors.values(), key=lambda t: (str(t.file), t.offset))  # read the base front to back
    plan = [Planned(t.name, t.dtype, t.shape) for t in order]
    work = _Work()

    def produce(p: Planned) -> Iterator[torch.Tensor]:
        info = base_tensors[p.name]
        for start, stop in row_chunks(info, chunk_bytes):
            rows = work.rows(info, start, stop, "base")
            if not (info.dtype.is_floating_point or info.dtype.is_complex):
                yield rows  # integer/bool buffers: copied as they are
                continue
            base_rows = work.as_float(rows, "base.f")
            deltas = [t.delta(work, p.name, base_rows, start, stop, f"task{i}") for i, t in enumerate(opened)]
            merged = fn(base_rows, deltas, weights, work.floats(base_rows.shape, "out"))
            yield merged if info.dtype == torch.float32 else work.cast(merged, info.dtype)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = write_shards(tmp, plan, produce, max_shard_bytes=max_shard_bytes,
                               metadata={"merge": method, "weights": json.dumps(weights)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    finally:
        work.close()
    _copy_side_files(base, tmp)
    info = {"method": method, "base": str(base), "tasks": [{"path": str(p), "weight": w} for p, w in tasks],
            "files": written, "tensors": len(plan), "bytes": sum(p.nbytes for p in plan)}
    (tmp / "merge.json").write_text(json.dumps(info, indent=2))  # written last: marks a complete merge
    if not (out / "merge.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a merge that died before its record: not one to keep
    publish(tmp, out)
    return info
