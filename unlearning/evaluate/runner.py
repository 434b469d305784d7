"""The evaluation runner: one model's evaluation, probes once, every metric of the suite, eval.json.

Which models are evaluated (eval.models' roles resolved through their stages) is `unlearning.stages`'s;
each model's evaluation is cached by content: the checkpoint's identity, the prepared data's
fingerprint, the eval settings and (for forget quality and PrivLeak) the oracle's identity. The oracle is
evaluated first, once, and its per-example values are the reference every other model is compared with.

Output per model: `<output_dir>/eval/<label>-<key>/eval.json` with
- `metrics`: flat name → aggregate (null when unavailable; `unavailable` gives the reason),
- `per_example`: the values behind every aggregate (two-sample metrics: a dict of both samples),
- `generations`: question, answer and greedy answer per evaluated item,
- `model`, `identity`, `data_fingerprint`, `suite`, `counts`, `timing`, `conventions`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.checkpoints import gguf_file
from unlearning.data.encoders import QAEncoder
from unlearning.data.prepare import PreparedData
from unlearning.errors import warn
from unlearning.evaluate.harness import harness_problems
from unlearning.evaluate.metrics import METRICS, EvalInputs, Value
from unlearning.evaluate.probes import SplitProbes, probe_split
from unlearning.evaluate.subject import Subject
from unlearning.evaluate.suites import get_suite
from unlearning.hashing import content_hash
from unlearning.models import load_causal_lm
from unlearning.schema import ExperimentConfig, Template

EVAL_VERSION = 2  # bump when the evaluation's inputs change meaning; the metric code itself is hashed below

CONVENTIONS = {
    "probability": "length-normalised p = exp(logπ(y|x)/|y|) over answer tokens incl. EOS; utility sets (no "
                   "paraphrase, perturbed answers): p_true / (p_true + Σ p_perturbed) (TOFU)",
    "accuracy": "sets scored as a choice: the answer's summed log-likelihood without EOS above every perturbed "
                "answer's (lm-evaluation-harness multiple-choice acc; ties wrong)",
    "rouge": "ROUGE-L recall, stemmed, greedy answer vs the answer (TOFU)",
    "truth_ratio": "TR = geometric mean of p(perturbed) / p(paraphrased answer), or / p(answer) on splits without "
                   "paraphrases; forget: mean min(TR, 1/TR); other splits: mean max(0, 1 − TR); per-example values "
                   "are the raw TR (TOFU)",
    "forget_quality": "two-sided two-sample KS p-value of per-item forget TR, model vs retain oracle (TOFU)",
    "model_utility": "harmonic mean of probability, ROUGE-L recall and truth ratio on retain and utility sets (TOFU)",
    "memorization": "extraction strength and exact memorization over answer tokens without EOS; ES of an item whose "
                    "last token is wrong is 1/n (open-unlearning)",
    "mia": "ROC AUC, forget (members) vs holdout (non-members); LOSS: mean NLL incl. EOS; ZLib: that / zlib length "
           "of the decoded answer labels; Min-K% and Min-K%++: floor(k·n) ≥ 1 lowest of the answer tokens without "
           "EOS, k = 40 %, variance clamped at 1e-6 (open-unlearning)",
    "privleak": "((1 − A) − (1 − A_oracle)) / (1 − A_oracle) × 100, A the Min-K% AUC (MUSE, open-unlearning)",
    "verbmem": "text splits: ROUGE-L F1 of the greedy continuation of each chunk's first eval.verbmem_prefix tokens "
               "against the chunk's next max_new_tokens (up to a document's end) (MUSE VerbMem)",
    "knowmem": "ROUGE-L F1 of the greedy answer against the answer, on forget / retain QA (MUSE KnowMem, zero-shot)",
    "text": "a text split's chunks are scored on every token (probability, MIA, memorization)",
}


@functools.cache
def definitions_hash() -> str:
    """A hash of the code that defines every probe and metric: a changed definition invalidates cached evaluations."""
    from unlearning.evaluate import knowledge, metrics, probes, suites

    return content_hash(*(inspect.getsource(m) for m in (metrics, knowledge, probes, suites)))


@dataclass(frozen=True)
class ModelEval:
    """One evaluated subject: its label, checkpoint path, the directory of its eval.json, the parsed file."""

    label: str
    path: Path
    eval_dir: Path
    result: dict[str, Any]
    cached: bool

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.result["metrics"]

    @property
    def in_context(self) -> bool:
        """Whether an in-context method was evaluated (on `path`'s weights, which are not its own)."""
        return "context" in self.result


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluated_rows(data: Any, split: str, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The rows of a split the evaluation scores: all of them, or `eval.max_items[split]` of them, a sample drawn
    from the data seed and kept in split order, the same for every model."""
    rows = list(data[split])
    return [rows[i] for i in evaluated_indices(len(rows), split, cfg)]


def evaluated_indices(n: int, split: str, cfg: ExperimentConfig) -> list[int]:
    """The indices `evaluated_rows` keeps of a split of n rows."""
    cap = cfg.eval.max_items.get(split)
    if cap is None or cap >= n:
        return list(range(n))
    return sorted(random.Random(f"{cfg.data_seed}-{split}").sample(range(n), cap))


def run_probes(model: Any, rows: dict[str, list[dict[str, Any]]], tokenizer: Any, cfg: ExperimentConfig, *,
               generations: bool | Collection[str], template: Template | None = None,
               max_length: int | None = None, encoders: Mapping[str, QAEncoder] | None = None
               ) -> dict[str, SplitProbes]:
    """Every probe of every split (`rows`: split → the evaluated rows), on an already loaded model.

    `generations`: greedy answers on every split, on none, or on the named splits; `encoders` (split → encoder,
    a subject's) encode each split's sequences, by default through `template` and `max_length` (default: the
    data's) beside each row's own answer sequence."""
    def generated(split: str) -> bool:
        return generations if isinstance(generations, bool) else split in generations

    def encoder(split: str) -> QAEncoder:
        if encoders is not None:
            return encoders[split]
        return QAEncoder(tokenizer, template or cfg.data.template, max_length or cfg.data.max_length)

    return {s: probe_split(model, r, encoder(s), batch_size=cfg.eval.batch_size,
                           max_new_tokens=cfg.eval.max_new_tokens, generations=generated(s),
                           verbmem_prefix=cfg.eval.verbmem_prefix)
            for s, r in rows.items()}


def compute_metrics(probes: dict[str, SplitProbes], metric_names: tuple[str, ...], *, oracle: dict[str, Any] | None,
                    is_oracle: bool, utility_splits: tuple[str, ...]) -> dict[str, Value]:
    """Run each named metric over the probes; later names never overwrite earlier ones silently."""
    inputs = EvalInputs(probes, oracle, is_oracle, utility_splits)
    values: dict[str, Value] = {}
    for name in metric_names:
        for key, value in METRICS.get(name).fn(inputs).items():
            if key in values:
                raise RuntimeError(f"metric {name!r} produced {key!r}, which another metric already did")
            values[key] = value
    return values


def evaluate_checkpoint(subject: Subject, prepared: PreparedData, cfg: ExperimentConfig, *, label: str,
                        oracle: ModelEval | None, is_oracle: bool) -> dict[str, Any]:
    """Load one subject's model, probe every split through its encoders, compute the suite; the eval.json
    content."""
    suite = get_suite(cfg.eval.suite)
    splits = cfg.eval.splits or list(prepared.info()["counts"])
    start = time.perf_counter()
    model = load_causal_lm(subject.path, cfg.model.dtype, cfg.model.trust_remote_code).to(_device())
    data = prepared.splits()
    rows = {s: evaluated_rows(data, s, cfg) for s in splits}
    window = cfg.eval.context_length or int(getattr(model.config, "max_position_embeddings", 0) or 0) \
        or cfg.data.max_length
    tokenizer = prepared.tokenizer()
    encoders = subject.encoders(rows, data, tokenizer, cfg, window)
    probes = run_probes(model, rows, tokenizer, cfg, generations=suite.generations, encoders=encoders)
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    values = compute_metrics(probes, suite.metrics, oracle=oracle.result if oracle else None, is_oracle=is_oracle,
                             utility_splits=tuple(cfg.eval.utility_splits))
    context = subject.describe()
    harness = _harness(model, tokenizer, cfg, data, in_context=bool(context))
    values.update({k: Value(v) for k, v in harness.get("metrics", {}).items()})
    if context:
        _warn_shortened(label, window, cfg, [e.summary() or {} for e in encoders.values()])
    return {
        "label": label, "model": str(subject.path), "identity": subject.identity,
        "data": str(prepared.path), "data_fingerprint": prepared.fingerprint, "suite": suite.name,
        "oracle": str(oracle.path) if oracle else None,
        **({"context": {**context, "encoding": {s: e.summary() for s, e in encoders.items()}}} if context else {}),
        "metrics": {k: v.value for k, v in values.items()},
        "unavailable": {k: v.reason for k, v in values.items() if v.value is None},
        "per_example": {k: v.per_example for k, v in values.items() if v.per_example is not None},
        "generations": {**{s: {"question": [r["question"] for r in rows[s]], "answer": p.answers,
                               "generation": p.generation}
                           for s, p in probes.items() if p.generation},
                        **{s: {"reference": p.references, "continuation": p.continuations}
                           for s, p in probes.items() if p.continuations is not None}},
        "counts": {s: len(p) for s, p in probes.items()},
        **({"lm_eval": harness} if harness else {}),
        "timing": {"probe_s": round(probe_s, 3), "metrics_s": round(time.perf_counter() - start, 3)},
        "conventions": CONVENTIONS,
    }


def _harness(model: Any, tokenizer: Any, cfg: ExperimentConfig, data: Any, *, in_context: bool) -> dict[str, Any]:
    """eval.lm_eval's tasks on the loaded model (`evaluate/harness.py`), or nothing when none are named. An
    in-context subject is its prompts, which the harness's tasks would not put before their questions."""
    if not cfg.eval.lm_eval.tasks:
        return {}
    if in_context:
        return {"skipped": "an in-context method: the harness's tasks would ask without its context"}
    import tempfile

    from unlearning.evaluate.harness import SPLIT_PREFIX, run_harness

    splits = {t.removeprefix(SPLIT_PREFIX): evaluated_rows(data, t.removeprefix(SPLIT_PREFIX), cfg)
              for t in cfg.eval.lm_eval.tasks if t.startswith(SPLIT_PREFIX)}  # the items our metric scores
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as work:
        return run_harness(model, tokenizer, cfg, splits, Path(work))


def _warn_shortened(label: str, window: int, cfg: ExperimentConfig, summaries: list[dict[str, Any]]) -> None:
    """Warn when the window cut the context of most sequences: the subject is then mostly the bare model."""
    total, shortened = (sum(s.get(k, 0) for s in summaries) for k in ("sequences", "shortened"))
    if total and shortened > total / 2:
        source = "eval.context_length" if cfg.eval.context_length else "the model's max_position_embeddings"
        warn(f"{label}: the window of {window} tokens ({source}) shortened the context of {shortened} of {total} "
             "sequences (demonstrations or the instruction dropped; eval.json's context.encoding counts them); "
             "raise eval.context_length if the model can read longer inputs")


def eval_key(subject: Subject | Path, prepared: PreparedData, cfg: ExperimentConfig, oracle: ModelEval | None
             ) -> str:
    """Everything one evaluation depends on (the name of its eval directory and its cache key): the subject's
    identity (a checkpoint path: its weights'), the data, the eval settings and code, the oracle's identity."""
    subject = as_subject(subject)
    settings = cfg.eval.model_dump(exclude={"models", "snapshots"})  # what is evaluated, not how
    suite = get_suite(cfg.eval.suite)
    return content_hash(EVAL_VERSION, definitions_hash(), suite.metrics, suite.generations, subject.identity,
                        prepared.fingerprint, settings, cfg.data.template.model_dump(), cfg.model.dtype,
                        oracle.result["identity"] if oracle else None)


def eval_dir(cfg: ExperimentConfig, label: str, subject: Subject | Path, prepared: PreparedData,
             oracle: ModelEval | None) -> Path:
    """The directory of one evaluation: its label and `eval_key`; the eval stage's key (on disk and in Prefect)."""
    return cfg.out / "eval" / f"{label}-{eval_key(subject, prepared, cfg, oracle)}"


def as_subject(subject: Subject | Path) -> Subject:
    """A checkpoint path as the subject that evaluates it as it is."""
    return subject if isinstance(subject, Subject) else Subject(Path(subject))


def evaluate_model(subject: Subject | Path, prepared: PreparedData, cfg: ExperimentConfig, *, label: str,
                   oracle: ModelEval | None = None, is_oracle: bool = False) -> ModelEval:
    """Evaluate one subject (a checkpoint path: as it is), or reuse its cached eval.json (written atomically, so
    never half)."""
    subject = as_subject(subject)
    out = eval_dir(cfg, label, subject, prepared, oracle)
    if (out / "eval.json").is_file():
        return ModelEval(label, subject.path, out, json.loads((out / "eval.json").read_text()), cached=True)
    result = evaluate_checkpoint(subject, prepared, cfg, label=label, oracle=oracle, is_oracle=is_oracle)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".eval.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "eval.json")
    return ModelEval(label, subject.path, out, result, cached=False)


def checkpoint_problems(cfg: ExperimentConfig, prepared: PreparedData) -> list[str]:
    problems = []
    for entry in cfg.eval.models:
        label, sep, path = entry.partition("=")
        if sep and not (Path(path) / "config.json").is_file() and gguf_file(path) is None:
            problems.append(f"eval.models: {label}={path}: no checkpoint there (no config.json, no .gguf file); give "
                            "the directory of a saved model (e.g. a run's model/ folder) or a GGUF file")
    info = prepared.info()
    counts = info["counts"]
    problems += harness_problems(cfg, counts, set(info.get("choice_splits", [])))
    for key, named in (("eval.splits", cfg.eval.splits or []), ("eval.max_items", list(cfg.eval.max_items))):
        missing = [s for s in named if s not in counts]
        if missing:
            problems.append(f"{key}: {missing} are not prepared splits; available: {', '.join(counts)}")
    return problems
