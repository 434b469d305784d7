"""Which DeepSpeed checkpoints of a run are complete: the files behind "resume from the last good checkpoint".

A checkpoint directory `step<N>` holds one model-states file and one optimizer shard per rank. It counts as
complete only once every rank has written and flushed its files and rank 0 has then recorded them, with their
sizes, in `step<N>/complete.json`; the `latest` pointer is moved to it after that record (`mark_complete`). A
rank killed mid-save leaves a directory without the record, or with a file missing or cut short: it is
skipped, and the run resumes from the newest complete one (`complete_tags`). Plain file functions: the
launching process reads them too, without torch.distributed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from unlearning.outputs import write_atomic

RECORD = "complete.json"
POINTER = "latest"


def step_of(tag: str) -> int:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else -1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_dir(path: Path) -> None:
    """fsync every file of `path` and the directory itself: written is durable, not only in the page cache."""
    for p in path.iterdir():
        if p.is_file():
            _fsync(p)
    _fsync(path)


def is_complete(tag_dir: Path) -> bool:
    """The record exists and every file it lists is there with its recorded size."""
    try:
        files = json.loads((tag_dir / RECORD).read_text())["files"]
        return bool(files) and all((tag_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints' tags, newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) >= 0), key=step_of,
                  reverse=True)
    return [t for t in tags if is_complete(ckpt_dir / t)]


def latest_complete(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[0] if tags else None


def mark_complete(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Record `tag`'s files (after every rank flushed them), point `latest` at it, and delete every other step
    directory but the newest `keep - 1` complete ones (incomplete ones too: a crashed save's leftovers)."""
    tag_dir = ckpt_dir / tag
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != RECORD}
    write_atomic(tag_dir / RECORD, json.dumps({"tag": tag, "files": files}, indent=1))
    write_atomic(ckpt_dir / POINTER, tag)
    kept = set(complete_tags(ckpt_dir)[:keep])
    for p in ckpt_dir.iterdir():
        if p.is_dir() and step_of(p.name) >= 0 and p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)
