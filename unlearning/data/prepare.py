"""The prepare stage: splits + tokenizer + encoded answers, saved under a content fingerprint.

Output: `<output_dir>/data/<fingerprint>/` holding `splits/` (a `datasets.DatasetDict` written by
`save_to_disk`, one split each of forget / retain / holdout / world_facts / other eval sets), `tokenizer/`
and `fingerprint.json`. The fingerprint covers the records (so the source and its revision), the
tokenizer, the template, the maximum length and the seed: same inputs, same directory, reused as is.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.data.loaders import is_choice, load_records
from unlearning.data.text import chunk_documents, is_text
from unlearning.data.tokenize import encode_prompts, encode_qa_many, load_tokenizer, train_tokenizer
from unlearning.errors import raise_if, warn
from unlearning.hashing import content_hash
from unlearning.outputs import publish
from unlearning.schema import ExperimentConfig

FORMAT_VERSION = 2  # bump when the encoding or fingerprint.json changes (2: text and choice splits named)


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset directory and its fingerprint."""

    path: Path
    fingerprint: str

    def splits(self) -> Any:
        import datasets

        return datasets.load_from_disk(str(self.path / "splits"))

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "fingerprint.json").read_text())


def tokenizer_source(cfg: ExperimentConfig) -> str | None:
    """Where the tokenizer comes from: a name/path, or None to train one locally (tiny default)."""
    if cfg.data.tokenizer.name:
        return cfg.data.tokenizer.name
    if cfg.model.base != "tiny":
        return cfg.model.base
    return cfg.model.target


def _texts(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    texts = []
    for rows in records.values():
        for r in rows:
            texts += [r.get("text", ""), r.get("question", ""), r.get("answer", ""), r.get("paraphrased_question", ""),
                      r.get("paraphrased_answer", "")]
            texts += r.get("perturbed_answer", [])
    return [t for t in texts if t]


def _qa(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The QA splits of the records (the text splits are chunked, not asked)."""
    return {split: rows for split, rows in records.items() if not is_text(rows)}


def _template_texts(cfg: ExperimentConfig) -> list[str]:
    # The template's own words, so the trained tokenizer encodes them compactly.
    return [cfg.data.template.prompt.format(question=""), cfg.data.template.answer_text("", chat=False)]


def _prompt_problems(records: dict[str, list[dict[str, Any]]], tokenizer: Any, cfg: ExperimentConfig) -> list[str]:
    """Every prompt an answer is scored after (questions and paraphrased questions) must leave room for at least
    one answer token within data.max_length: a prompt cut to the limit would score an empty answer, p = exp(0)."""
    tpl, max_len = cfg.data.template, cfg.data.max_length
    questions = list(dict.fromkeys(q for rows in _qa(records).values() for r in rows
                                   for q in (r["question"], r.get("paraphrased_question")) if q))
    lengths = [len(ids) for ids in encode_prompts(tokenizer, tpl, questions)]
    too_long = [(q, n) for q, n in zip(questions, lengths, strict=True) if n >= max_len]
    if not too_long:
        return []
    longest = max(n for _, n in too_long)
    return [f"{len(too_long)} prompts are at least data.max_length={max_len} tokens long, leaving no room for the "
            f"answer (first: {too_long[0][0][:60]!r}, longest {longest} tokens); raise data.max_length above "
            f"{longest}, or shorten the questions or the template"]


def _truncation_warning(records: dict[str, list[dict[str, Any]]], tokenizer: Any, cfg: ExperimentConfig) -> int:
    """Warn about QA pairs whose answer is cut at data.max_length (they lose their EOS); returns how many."""
    tpl, max_len = cfg.data.template, cfg.data.max_length
    pairs = [(r["question"], a) for rows in _qa(records).values() for r in rows
             for a in (r["answer"], r.get("paraphrased_answer"), *r.get("perturbed_answer", [])) if a]
    cut = [enc for enc in encode_qa_many(tokenizer, tpl, pairs, max_len) if enc["labels"][-1] != tokenizer.eos_token_id]
    if cut:
        warn(f"{len(cut)} of {len(pairs)} answers are cut at data.max_length={max_len} tokens and lose their EOS; "
             "their probabilities score a prefix of the answer. Raise data.max_length to keep them whole")
    return len(cut)


def _encode(records: dict[str, list[dict[str, Any]]], tokenizer: Any, cfg: ExperimentConfig) -> dict[str, list]:
    tpl, max_len = cfg.data.template, cfg.data.max_length
    raise_if(_prompt_problems(records, tokenizer, cfg))
    return {split: chunk_documents(tokenizer, [r["text"] for r in rows], max_len) if is_text(rows) else
            [{**r, **enc} for r, enc in zip(
                rows, encode_qa_many(tokenizer, tpl, [(r["question"], r["answer"]) for r in rows], max_len),
                strict=True)]
            for split, rows in records.items()}


@dataclass(frozen=True)
class _Inputs:
    """What the prepared data is made of, loaded: the records, the tokenizer (None: trained locally) and its
    identity, and the fingerprint of them all."""

    records: dict[str, list[dict[str, Any]]]
    tokenizer: Any
    tokenizer_id: tuple[Any, ...]
    fingerprint: str


def _inputs(cfg: ExperimentConfig) -> _Inputs:
    records = load_records(cfg)
    records_hash = content_hash(records)
    source = tokenizer_source(cfg)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code) if source else None
    if tokenizer is not None:
        tok_id: tuple = ("pretrained", source, content_hash(tokenizer.backend_tokenizer.to_str(),
                                                            getattr(tokenizer, "chat_template", None)))
    else:
        tok_id = ("trained-bpe", cfg.data.tokenizer.vocab_size, records_hash)
    fingerprint = content_hash(FORMAT_VERSION, records_hash, tok_id, cfg.data.template.model_dump(),
                               cfg.data.max_length, cfg.data_seed)
    return _Inputs(records, tokenizer, tok_id, fingerprint)


def prepare_key(cfg: ExperimentConfig) -> str:
    """The prepare stage's key: the fingerprint of what it reads (the records as loaded now, so an edited file
    or a changed hub dataset changes it; the tokenizer; template, length and seed). The name of its output
    directory, and the Prefect task's cache key."""
    return _inputs(cfg).fingerprint


def prepare(cfg: ExperimentConfig) -> PreparedData:
    """Load, check, tokenize and save the splits; reuse the saved copy when the fingerprint matches."""
    inputs = _inputs(cfg)
    records, tokenizer, tok_id, fingerprint = inputs.records, inputs.tokenizer, inputs.tokenizer_id, inputs.fingerprint
    out = cfg.out / "data" / fingerprint
    if (out / "fingerprint.json").is_file():
        return PreparedData(out, fingerprint)

    if tokenizer is None:
        texts = _texts(records)
        tokenizer = train_tokenizer(texts + _template_texts(cfg) * (len(texts) // 5), cfg.data.tokenizer.vocab_size)
    encoded = _encode(records, tokenizer, cfg)
    truncated = _truncation_warning(records, tokenizer, cfg)
    _write(out, encoded, tokenizer, {
        "fingerprint": fingerprint,
        "source": cfg.data.source,
        "data": cfg.data.model_dump(mode="json"),
        "tokenizer": list(tok_id),
        "seed": cfg.data_seed,
        "counts": {split: len(rows) for split, rows in encoded.items()},
        "documents": {split: len(rows) for split, rows in records.items() if is_text(rows)},  # text: counts are chunks
        "choice_splits": sorted(split for split, rows in records.items() if is_choice(rows)),
        "entities": {split: len({r.get("entity") for r in rows} - {None}) for split, rows in records.items()},
        "truncated_answers": truncated,
    })
    return PreparedData(out, fingerprint)


def derive(prepared: PreparedData, name: str, keep: dict[str, list[int]]) -> PreparedData:
    """A prepared dataset with only rows `keep[split]` of the named splits (the others whole), saved beside
    its parent under its own fingerprint; e.g. one forget request of a sequence."""
    import datasets

    fingerprint = content_hash(FORMAT_VERSION, prepared.fingerprint, name, keep)
    out = prepared.path.parent / fingerprint
    if (out / "fingerprint.json").is_file():
        return PreparedData(out, fingerprint)
    parent = prepared.splits()
    splits = datasets.DatasetDict({s: parent[s].select(keep[s]) if s in keep else parent[s] for s in parent})
    info = {**prepared.info(), "fingerprint": fingerprint, "parent": prepared.fingerprint, "subset": {name: keep},
            "counts": {s: len(d) for s, d in splits.items()},
            "entities": {s: len(set(d["entity"]) - {None}) if "entity" in d.column_names else 0
                         for s, d in splits.items()}}
    _write(out, splits, prepared.tokenizer(), info)
    return PreparedData(out, fingerprint)


def _write(out: Path, encoded: dict[str, list] | Any, tokenizer: Any, info: dict[str, Any]) -> None:
    """Write to a temporary sibling and rename it into place, so a crash never leaves a half dataset.

    `encoded`: split → rows, or a ready `datasets.DatasetDict`."""
    import datasets

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits = encoded if isinstance(encoded, datasets.DatasetDict) else datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows) for s, rows in encoded.items()})
    splits.save_to_disk(str(tmp / "splits"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "fingerprint.json").write_text(json.dumps(info, indent=2))
    publish(tmp, out)  # a concurrent writer that finished first wrote identical content: theirs is kept
