"""Read and write (sharded) safetensors checkpoints a slice at a time, so memory stays near one slice.

The `safetensors` library reads whole tensors through a memory map, which keeps every touched page of
the file resident, and writes only complete dicts of tensors. A streamed merge needs neither: a
safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw bytes, so the writer lays out every header up front (shapes and
dtypes are known before any value is computed) and appends each tensor's bytes as its rows are
produced, and the reader fetches a row range with one positioned read. Files written here are read
back with `safetensors.safe_open` and `from_pretrained` in the tests.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: its file, dtype, shape and absolute byte offset."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file: name → where its bytes are."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    start = 8 + size
    return {name: TensorInfo(name, path, DTYPES[h["dtype"]], tuple(h["shape"]), start + h["data_offsets"][0])
            for name, h in header.items()}


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: `model.safetensors`, or the shards its index names."""
    index = directory / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{directory} holds neither {SINGLE} nor {INDEX}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(read_header(directory / name))
    return tensors


def read_rows(info: TensorInfo, start: int, stop: int, handle: io.BufferedReader | None = None,
              buffer: bytearray | None = None) -> torch.Tensor:
    """Rows [start, stop) of a tensor (the whole of a 0-d tensor), read with one positioned read, into
    `buffer` when given (reused by the caller; the result is a view of it), else into new memory."""
    n = (stop - start) * info.row_bytes
    buf = memoryview(buffer)[:n] if buffer is not None else bytearray(n)
    if handle is None:
        with info.file.open("rb") as f:
            f.seek(info.offset + start * info.row_bytes)
            f.readinto(buf)
    else:
        handle.seek(info.offset + start * info.row_bytes)
        handle.readinto(buf)
    flat = torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype) if n else torch.empty(0, dtype=info.dtype)
    return flat.reshape((stop - start, *info.shape[1:]) if info.shape else ())


def row_chunks(info: TensorInfo, chunk_bytes: int) -> Iterable[tuple[int, int]]:
    """Row ranges of at most `chunk_bytes` each (at least one row)."""
    step = max(1, chunk_bytes // max(info.row_bytes, 1))
    for start in range(0, info.rows, step):
        yield start, min(start + step, info.rows)


@dataclass(frozen=True)
class Planned:
    """A tensor the writer will produce: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[Planned], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned


def write_shards(directory: Path, plan: list[Planned], produce: Callable[[Planned], Iterable[torch.Tensor]], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None = None) -> list[str]:
    """Write the planned tensors, in order, as safetensors shards of `directory` (+ the index when there
    is more than one shard); `produce(t)` yields t's rows in order, chunk by chunk.

    Returns:
        The file names written.

    Raises:
        RuntimeError: a tensor's chunks do not add up to its planned dtype and size.
    """
    shards = plan_shards(plan, max_shard_bytes)
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    for file, shard in zip(files, shards, strict=True):
        with (directory / file).open("wb") as out:
            header = _header(shard, meta)
            out.write(struct.pack("<Q", len(header)) + header)
            for t in shard:
                written = 0
                for rows in produce(t):
                    if rows.dtype != t.dtype:
                        raise RuntimeError(f"{t.name}: produced {rows.dtype}, planned {t.dtype}")
                    if rows.numel():
                        out.write(rows.contiguous().view(torch.uint8).numpy().data)  # no copy
                    written += rows.numel() * rows.element_size()
                if written != t.nbytes:
                    raise RuntimeError(f"{t.name}: produced {written} bytes, planned {t.nbytes}")
            out.flush()
            os.fsync(out.fileno())
    if n > 1:
        weight_map = {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    return files
