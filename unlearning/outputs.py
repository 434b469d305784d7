"""Stage outputs that concurrent runs share safely: one builder at a time, published whole or not at all.

Every stage writes its output under a content key into a temporary sibling and renames it into place
(`publish`), so a crash never leaves half an output. Two runs that need the same output at once (the same
config started twice, two sweeps sharing a target) take its lock (`building`): the second waits for the first
and then finds the output done instead of building it again; if it was built anyway (the lock's directory
is not shared, say), the second copy is discarded, not renamed over the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (named by this process), flush it, and rename it over
    `path`: a reader sees the old content or the new, never half of it, and concurrent writers never collide."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(tmp: Path, out: Path) -> bool:
    """Rename the finished directory `tmp` to `out`; if `out` already exists (another run published the same
    content first), delete `tmp` and keep theirs. Returns whether ours was published."""
    if out.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    try:
        os.replace(tmp, out)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and out.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


@contextlib.contextmanager
def locked(path: Path, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock file `path` (flock: released by the kernel when the holder dies, however it dies); while
    another process holds it, say so once on stderr and wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() if path.is_file() else ""
            print(f"waiting for another process{f' ({holder})' if holder else ''} {what} ({path})", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, mode)
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def building(out: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of one output directory: `with building(out): if not done(out): build and publish`."""
    return locked(out.with_name(f".{out.name}.lock"), f"is building {out.name}")


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where creating `path` would start."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def output_problems(out: Path) -> list[str]:
    """Why the run could not write its outputs under `out` (checked before any stage starts), if it could not."""
    probe = nearest_existing(out)
    if probe.exists() and not probe.is_dir():
        return [f"output_dir {out} lies under {probe}, which is a file, not a directory; choose another "
                "output_dir=<directory>"]
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the output directory" if probe == out else f"{probe}, where it would be created,"
        report = out / "report" / "report.md"
        kept = f" (its last report is readable as it is: {report})" if report.is_file() else ""
        return [f"output_dir {out}: {what} is not writable by this user, and every run writes to it (even a fully "
                f"cached one rewrites its report and resolved config){kept}; choose another "
                "output_dir=<directory> or fix its permissions"]
    return []
