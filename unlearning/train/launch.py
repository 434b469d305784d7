"""Build the launcher command line of a distributed run (an argv list, never a shell string)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from unlearning.errors import UserError


def free_port() -> int:
    """A TCP port that is free on this host right now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_gpu() -> bool:
    """Whether this machine has a CUDA device (else ranks run on CPU with gloo)."""
    import torch

    return bool(torch.cuda.is_available())


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """Parse a DeepSpeed hostfile: one `host slots=N` per line, `#` comments allowed."""
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(" ")
        key, _, value = slots.strip().partition("=")
        if key != "slots" or not value.isdigit() or int(value) < 1:
            raise UserError(f"{path}:{n}: expected 'HOST slots=N', got {line!r}")
        hosts.append((host, int(value)))
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts")
    return hosts


def launch_argv(*, launcher: str, num_processes: int, num_nodes: int, module: str, args: list[str],
                hostfile: str | None = None, master_addr: str = "127.0.0.1", master_port: int = 29500,
                node_rank: int = 0, on_cpu: bool = True) -> list[str]:
    """The argv that starts `num_processes` ranks per node of `python -m module args...`.

    torchrun runs one node per invocation (rendezvous on master_addr:master_port); the `deepspeed`
    launcher reaches every node of a hostfile over ssh itself. On CPU the deepspeed launcher must be
    told the rank count with `--num_gpus`, or it starts one.
    """
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={num_nodes}",
                f"--nproc-per-node={num_processes}", f"--node-rank={node_rank}",
                f"--master-addr={master_addr}", f"--master-port={master_port}", "-m", module, *args]
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", f"--master_addr={master_addr}",
            f"--master_port={master_port}"]
    if hostfile:
        argv += [f"--hostfile={hostfile}", f"--num_nodes={num_nodes}"]
    if on_cpu or not hostfile:
        argv += [f"--num_gpus={num_processes}"]
    return [*argv, "--module", module, *args]
