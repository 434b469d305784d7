"""Orchestration benchmark: the same tiny pipeline as plain stage calls and under Prefect + MLflow.

Both arms run every stage from scratch (each in its own fresh output directory, so no cache is shared):
prepare, build target and oracle, unlearn with two methods, merge one λ, evaluate the six models. The
plain arm calls the stage functions in a row (`unlearning.stages`); the orchestrated arm runs the
`unlearning-pipeline` flow against Prefect's ephemeral local server with a SQLite MLflow store, which adds
task runs with persisted results, nested MLflow runs, logged metrics, histories and artifacts, the report
and the registered models. The server's start and the MLflow store's creation (schema migrations) happen
once, are timed on their own and are not counted in the overhead.

The arms alternate (plain, orchestrated, plain, ...) `--repeats` times; the overhead is the difference of
the medians against the plain median (target ≤ 5 %).

    .venv/bin/python bench/bench_pipeline.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "runs" / "bench-pipeline"
sys.path.insert(0, str(REPO))


def config(out: Path, uri: str) -> dict[str, Any]:
    """A small experiment: 24 people, a 2-layer 64-wide Llama, two methods, one merge, the tofu suite."""
    return {
        "name": "bench-pipeline", "seed": 0, "output_dir": str(out),
        "data": {"forget_fraction": 0.25, "holdout_fraction": 0.25, "max_length": 48,
                 "synthetic": {"num_entities": 24, "facts_per_entity": 4, "num_utility": 8},
                 "tokenizer": {"vocab_size": 400}},
        "model": {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
                  "finetune": {"epochs": 30, "batch_size": 8, "lr": 5e-3}},
        "methods": [{"name": "ga"}, {"name": "npo", "alpha": 1.0}],
        "train": {"num_processes": 2, "batch_size": 4, "max_steps": 8, "lr": 1e-3},
        "merge": {"lambdas": [2.0], "finetune": {"lr": 3e-3, "max_steps": 8}},
        "eval": {"suite": "tofu", "max_new_tokens": 16},
        "tracking": {"uri": uri},
    }


def plain(raw: dict[str, Any]) -> None:
    from unlearning import stages
    from unlearning.config import method_runs, validate_config

    cfg = validate_config(raw)
    stages.prepare(cfg)
    stages.build_models(cfg)
    for run in method_runs(cfg).values():
        stages.unlearn(run)
    stages.merge(cfg)
    stages.evaluate(cfg)


def orchestrated(raw: dict[str, Any]) -> None:
    from flows.pipeline import pipeline

    pipeline(raw)


def start_server() -> float:
    """Start Prefect's ephemeral server (what the first flow of a process would do); seconds taken."""
    from prefect.client.orchestration import get_client

    start = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.hello()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    server_s = start_server()
    uri = f"sqlite:///{WORK / 'mlflow.db'}"
    start = time.perf_counter()
    from unlearning.tracking import tracker_for

    tracker_for(uri, "bench-pipeline")  # creates the store: schema migrations, once per database
    store_s = time.perf_counter() - start
    times: dict[str, list[float]] = {"plain": [], "prefect+mlflow": []}
    for i in range(args.repeats):
        for arm, fn in (("plain", plain), ("prefect+mlflow", orchestrated)):
            out = WORK / f"{arm.replace('+', '-')}-{i}"
            raw = config(out, uri)
            start = time.perf_counter()
            fn(raw)
            times[arm].append(time.perf_counter() - start)
            print(f"  {arm:<15} repeat {i}: {times[arm][-1]:6.1f} s", flush=True)
    a, b = statistics.median(times["plain"]), statistics.median(times["prefect+mlflow"])
    print(f"\nPrefect ephemeral server start: {server_s:.1f} s (once per process; not in the totals)")
    print(f"MLflow SQLite store creation: {store_s:.1f} s (once per database; not in the totals)")
    print(f"{'arm':<16}{'median s':>10}  all")
    for arm, ts in times.items():
        print(f"{arm:<16}{statistics.median(ts):>10.1f}  {', '.join(f'{t:.1f}' for t in ts)}")
    print(f"orchestration overhead: {b - a:+.1f} s = {(b - a) / a:+.1%} of the plain pipeline (target ≤ 5 %)")


if __name__ == "__main__":
    main()
