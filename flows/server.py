"""Prefect's temporary API server, started by `unlearn` itself so that it never outlives it.

With no PREFECT_API_URL configured, Prefect starts a temporary server (uvicorn, in a subprocess) the first
time a flow needs an API. If `unlearn` is then killed (SIGKILL, the OOM killer, a lost terminal), nothing
stops that server: it stays up, holding a port and its database, for many minutes. And the kernel's
parent-death signal cannot be given to it from outside, because Prefect starts it from whichever thread first
needs an API, and the signal fires when that thread ends.

`own_server` starts the same server from the main thread instead, through
`unlearning.train.lifetime.orphan_proof` (the kernel kills it when `unlearn` dies), before Prefect is
imported: PREFECT_API_URL then points at it, so Prefect never starts its own. It is stopped at exit.
The start overlaps the caller's imports (torch, transformers): `wait` blocks only for what is left. A
configured PREFECT_API_URL (a real server) is used as it is, and so is a Prefect already imported in this
process (a notebook or a test calling the flows directly keeps Prefect's own server).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO

from unlearning.errors import UserError
from unlearning.train.launch import free_port
from unlearning.train.lifetime import orphan_proof

HOST = "127.0.0.1"
STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# What Prefect's own temporary server is started with: no UI, the ephemeral server's services.
EPHEMERAL_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class TemporaryServer:
    """A started server process and its API URL; `wait()` until it answers."""

    def __init__(self, process: subprocess.Popen, url: str, log: IO[bytes]):
        self.process, self.url, self._log = process, url, log

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the API answers at /health; a `UserError` with the fix when it exits or never answers."""
        timeout_s = timeout_s if timeout_s is not None else float(os.environ.get(STARTUP_ENV, "120"))
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        self._log.seek(0)
        tail = "\n".join(self._log.read().decode(errors="replace").splitlines()[-15:])
        state = (f"exited with status {self.process.returncode}" if self.process.poll() is not None
                 else f"did not answer within {timeout_s:g} s")
        raise UserError(f"Prefect's temporary API server {state}; set PREFECT_API_URL to a running server "
                        f"(`prefect server start`), or raise {STARTUP_ENV} on a slow machine"
                        + (f"; its output ends:\n{tail}" if tail else ""))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _prefect_dir() -> Path:
    """Where the prefect package is installed (uvicorn's --app-dir), found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise UserError("prefect is not installed: `make env` installs the locked stack")
    return Path(spec.origin).parent.parent


def start() -> TemporaryServer:
    """Start the server (not waiting for it) and point PREFECT_API_URL at it."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(_prefect_dir()), "--factory",
            "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port), "--log-level", "error",
            "--lifespan", "on"]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's output, kept until `stop`)
    process = subprocess.Popen(orphan_proof(argv), env={**os.environ, **EPHEMERAL_ENV}, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = TemporaryServer(process, f"http://{HOST}:{port}/api", log)
    os.environ["PREFECT_API_URL"] = server.url
    return server


def own_server() -> TemporaryServer | None:
    """Start this process's own temporary Prefect server, stopped at exit, or None where one is not wanted (see
    the module docstring); call `wait()` on it before running a flow. Its stop is registered before Prefect is
    imported, so it runs after Prefect's own exit handlers (which flush their last logs to the API)."""
    wanted = (not os.environ.get("PREFECT_API_URL") and "prefect" not in sys.modules
              and os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() not in ("0", "false"))
    if not wanted:
        return None
    server = start()
    atexit.register(server.stop)
    return server
