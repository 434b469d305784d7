"""Sequential unlearning: forget requests applied one after another, each starting from the last result.

The forget set is cut into ordered requests (`sequence.requests`: N groups of its entities, or named
lists of entities). Request i unlearns only its own items, starting from the model request i − 1 produced
(the target for the first), with the config's one method. After each request the model is evaluated once
on the whole prepared data, and the ledger records, for every request so far, the forget metrics on its
items, the forget quality on everything forgotten so far (KS test of those items' truth ratios against the
retain oracle's, which never saw any of them) and the model utility. The ledger,
`<output_dir>/sequence/<key>/ledger.json`, is rewritten atomically after every request, and each request's
unlearning and evaluation are cached, so a rerun after a failure continues with the request that failed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unlearning.config import method_runs
from unlearning.data.prepare import derive, prepare
from unlearning.errors import UserError, raise_if
from unlearning.evaluate.metrics import ks_pvalue
from unlearning.evaluate.runner import evaluate_model
from unlearning.evaluate.suites import SUITES, get_suite
from unlearning.hashing import content_hash
from unlearning.models import build_models, model_identity
from unlearning.schema import ExperimentConfig
from unlearning.unlearn import data_problems, launch_problems, unlearn

PER_REQUEST = ("forget_probability", "forget_rouge", "forget_truth_ratio")
LEDGER_METRICS = ("probability", "truth_ratio", "model_utility")  # what the ledger reads from each evaluation


@dataclass(frozen=True)
class Request:
    """One forget request: its entities and their rows in the prepared forget split."""

    index: int
    entities: list[str]
    rows: list[int]


def plan_requests(cfg: ExperimentConfig, forget_entities: list[str | None]) -> list[Request]:
    """The ordered requests, from `sequence.requests` and the forget split's entity column (row order)."""
    spec = cfg.sequence.requests
    if all(e is None for e in forget_entities):  # no entity column: each row stands for itself
        forget_entities = [f"row{i}" for i in range(len(forget_entities))]
    order = list(dict.fromkeys(e for e in forget_entities if e is not None))
    if isinstance(spec, int):
        if spec > len(order):
            raise UserError(f"sequence.requests={spec} but the forget set has only {len(order)} entities; ask for "
                            f"at most {len(order)} requests")
        groups = [list(g) for g in np.array_split(np.array(order, dtype=object), spec)]
    else:
        unknown = sorted({e for g in spec for e in g} - set(order))
        flat = [e for g in spec for e in g]
        twice = sorted({e for e in flat if flat.count(e) > 1})
        problems = []
        if unknown:
            problems.append(f"sequence.requests: {unknown} are not entities of the forget set; it has: "
                            f"{', '.join(order[:20])}{' …' if len(order) > 20 else ''}")
        if twice:
            problems.append(f"sequence.requests: {twice} are requested more than once; each entity is forgotten once")
        raise_if(problems)
        groups = [list(g) for g in spec]
    return [Request(i + 1, [str(e) for e in g], [r for r, e in enumerate(forget_entities) if e in set(g)])
            for i, g in enumerate(groups)]


def so_far_metrics(result: dict[str, Any], oracle: dict[str, Any], requests: list[Request], upto: int
                   ) -> dict[str, Any]:
    """Metrics after request `upto`: per request (means over its items; those not yet applied too, flagged,
    which shows collateral forgetting), and over the items of requests 1..upto the forget quality against the
    oracle and the mean forget probability; model utility as evaluated."""
    per = result["per_example"]
    per_request = {str(r.index): {"applied": r.index <= upto, **{
        m: float(np.mean([per[m][i] for i in r.rows])) for m in PER_REQUEST if m in per}} for r in requests}
    rows = [i for r in requests[:upto or len(requests)] for i in r.rows]  # before any request: all of them
    tr = "forget_truth_ratio"
    fq = (ks_pvalue(np.asarray([per[tr][i] for i in rows]), np.asarray([oracle["per_example"][tr][i] for i in rows]))
          if tr in per and tr in oracle["per_example"] else None)
    return {"forget_quality": fq, "model_utility": result["metrics"].get("model_utility"),
            "forget_probability": float(np.mean([per["forget_probability"][i] for i in rows])),
            "per_request": per_request}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


@dataclass(frozen=True)
class SequenceResult:
    ledger: dict[str, Any]
    path: Path
    plot: Path


def sequence(cfg: ExperimentConfig, on_request: Callable[[dict[str, Any]], None] | None = None) -> SequenceResult:
    """Apply the forget requests in order; write the ledger after each one and the plot at the end."""
    runs = method_runs(cfg)
    if len(runs) != 1:
        raise UserError(f"unlearn sequence applies one method, and the config lists {len(runs)} ({', '.join(runs)}); "
                        "keep one `methods` entry, or set method.name")
    label, run = next(iter(runs.items()))
    missing = [m for m in LEDGER_METRICS if m not in get_suite(run.eval.suite).metrics]
    if missing:
        raise UserError(f"unlearn sequence records {', '.join(LEDGER_METRICS)} after each request, and eval.suite="
                        f"{run.eval.suite} lacks {', '.join(missing)}; use a suite that has them: "
                        f"{', '.join(s for s, suite in SUITES.items() if set(LEDGER_METRICS) <= set(suite.metrics))}")
    if "forget" in run.eval.max_items:
        raise UserError("unlearn sequence reads each request's forget items from the evaluation; remove "
                        "eval.max_items.forget")
    if cfg.seeds:
        raise UserError("unlearn sequence runs one seed; remove `seeds` (or run it once per seed with seed=N)")
    raise_if(launch_problems(run))
    prepared = prepare(run)
    if "forget" in prepared.info().get("documents", {}):
        raise UserError("unlearn sequence forgets the forget set's people request by request and records forget "
                        "quality after each, and the forget split is text (chunks of a corpus, without people or truth "
                        "ratios); run the text benchmark with `unlearn run`")
    forget = prepared.splits()["forget"]
    requests = plan_requests(run, list(forget["entity"]) if "entity" in forget.column_names else [None] * len(forget))
    request_data = [derive(prepared, f"request{r.index}", {"forget": r.rows}) for r in requests]
    raise_if([f"request {r.index} ({len(r.rows)} items): {p}" for r, data in zip(requests, request_data, strict=True)
              for p in data_problems(run, data)])
    built = build_models(run)
    oracle = evaluate_model(built.oracle, prepared, run, label="oracle", is_oracle=True)
    target = evaluate_model(built.target, prepared, run, label="target", oracle=oracle)

    key = content_hash(model_identity(built.target), prepared.fingerprint, run.method.model_dump(),
                       run.train.model_dump(), [r.entities for r in requests], run.seed)
    out = run.out / "sequence" / f"{label}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    ledger: dict[str, Any] = {
        "method": run.method.model_dump(), "train": run.train.model_dump(), "target": str(built.target),
        "oracle": str(built.oracle), "data_fingerprint": prepared.fingerprint,
        "requests": [{"request": r.index, "entities": r.entities, "items": len(r.rows)} for r in requests],
        "before": so_far_metrics(target.result, oracle.result, requests, 0) | {"eval": str(
            target.eval_dir / "eval.json")},
        "applied": [],
    }
    model: Path = built.target
    for request, data in zip(requests, request_data, strict=True):
        started = time.time()
        done = unlearn(run, prepared=data, target=model)
        result = evaluate_model(done.model, prepared, run, label=f"request{request.index}", oracle=oracle)
        entry = {"request": request.index, "entities": request.entities, "items": len(request.rows),
                 "data_fingerprint": data.fingerprint, "started_from": str(model), "model": str(done.model),
                 "unlearn_run": str(done.run_dir), "cached": done.cached and result.cached,
                 "wall_s": round(time.time() - started, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "eval": str(result.eval_dir / "eval.json"),
                 **so_far_metrics(result.result, oracle.result, requests, request.index)}
        ledger["applied"].append(entry)
        _write_json(out / "ledger.json", ledger)
        if on_request:
            on_request(entry)
        model = done.model
    from unlearning.evaluate.report import sequence_plot

    plot = sequence_plot(ledger, out / "sequence.png", title=f"{run.name}: {label}, {len(requests)} requests")
    return SequenceResult(ledger, out / "ledger.json", plot)
