"""The data section: where the splits come from, how a QA pair becomes text, the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from unlearning.schema.base import Fraction, Strict

QA_COLUMNS = ("question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer", "cloze",
              "cloze_answer", "cloze_wrong")
TEXT_COLUMN = "text"  # a split of documents (MUSE-style corpora) instead of QA pairs: chunked, scored on every token
LIST_COLUMNS = ("perturbed_answer", "cloze_wrong")  # lists of strings; the others are text
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class SyntheticData(Strict):
    """Built-in generator of fictitious people and facts (TOFU schema)."""

    num_entities: int = Field(100, ge=3, description="invented people; split by person")
    facts_per_entity: int = Field(6, ge=1, le=10, description="QA pairs per person (at most 10 kinds)")
    num_perturbed: int = Field(3, ge=3, description="wrong answers of the same type per item")
    num_utility: int = Field(30, ge=0, description="general (world) facts kept in every training set")
    answer_style: Literal["short", "sentence"] = Field(
        "short", description="short: the value ('Drulzeath.'); sentence: 'X was born in Drulzeath.'")
    format: Literal["qa", "text", "choice"] = Field(
        "qa", description="qa: forget / retain / holdout are QA pairs (TOFU); text: they are prose passages, one "
        "per person (a MUSE-style corpus, chunked), and forget_qa / retain_qa / holdout_qa hold the same people's "
        "QA pairs for KnowMem; choice (WMDP-style): forget / holdout are passages about invented lab agents (a "
        "'hazardous' domain), retain the retained people's passages, and forget_choice / holdout_choice / "
        "retain_choice ask their facts as 4-option multiple choice")


class Template(Strict):
    """How a QA pair becomes text. Prompt tokens are masked out of the labels."""

    prompt: str = "Question: {question}\nAnswer:"
    answer: str | None = Field(None, description="how the answer follows the prompt; default ' {answer}' after "
                               "`prompt`, '{answer}' after a chat template's assistant turn")
    chat: bool | None = Field(None, description="use the tokenizer's chat template instead of `prompt`; default: "
                              "when the tokenizer has one (a chat model's), else not")
    response_prefix: str = Field("", description="text the response starts with, after the prompt (after the "
                                 "assistant turn with a chat template) and before the answer; part of the prompt, "
                                 "never scored (the attack stage's affirmative prefix, 'Sure, the answer is')")

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether prompts go through `tokenizer`'s chat template."""
        return bool(getattr(tokenizer, "chat_template", None)) if self.chat is None else self.chat

    def answer_text(self, answer: str, chat: bool) -> str:
        """The text an answer is encoded from, after its prompt."""
        glued = chat and not self.response_prefix  # right after the assistant turn: no separating space
        return (self.answer or ("{answer}" if glued else " {answer}")).format(answer=answer)

    @pydantic.field_validator("prompt")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain the placeholder {question}")
        return v

    @pydantic.field_validator("answer")
    @classmethod
    def _has_answer(cls, v: str | None) -> str | None:
        if v is not None and "{answer}" not in v:
            raise ValueError("must contain the placeholder {answer}")
        return v


class TokenizerConfig(Strict):
    name: str | None = Field(
        None, description="HF tokenizer name or path; default: the model's own, or trained locally for tiny"
    )
    vocab_size: int = Field(1024, ge=300, description="vocabulary of the locally trained tokenizer")


BUILTIN_PREFIX = "builtin:"
GENERATED_SPLITS = ("forget", "retain", "holdout", "world_facts")  # what source=synthetic generates
TEXT_QA_SPLITS = ("forget_qa", "retain_qa", "holdout_qa", "forget_choice", "retain_choice", "holdout_choice")
CHOICE_COLUMNS = ("choices", "answer_index")  # a multiple-choice split: the options and the right one's index


def is_file_spec(spec: str) -> bool:
    """Whether a `data.splits` entry names a file (JSONL/CSV/Parquet, or a packaged `builtin:` set) rather than a
    config of a `datasets` source."""
    return spec.startswith(BUILTIN_PREFIX) or Path(spec).suffix.lower() in FILE_SUFFIXES


class DataConfig(Strict):
    source: Literal["synthetic", "hf", "files"] = "synthetic"
    path: str | None = Field(None, description="source=hf: a hub dataset name or a local dataset path")
    revision: str | None = Field(None, description="source=hf: the hub revision (branch, tag or commit) to load; a "
                                 "commit pins the data. Default: the main branch as the hub has it now (or as "
                                 "cached, offline); the prepared data's fingerprint covers the records loaded "
                                 "either way, so a changed dataset is prepared again")
    splits: dict[str, str] = Field(
        default_factory=dict,
        description="split -> 'config' or 'config:split' (source=hf), a JSONL/CSV/Parquet path, or a packaged set "
                    "('builtin:tofu/real_authors', 'builtin:tofu/world_facts'); with source=synthetic, extra "
                    "evaluation splits beside the generated forget/retain/holdout/world_facts")
    columns: dict[str, str | dict[str, str]] = Field(
        default_factory=dict, description="our column -> the source's column, for every split; or split -> "
                                          "{our column: the source's column} for one split (both may be given)")
    forget_fraction: Fraction = Field(0.1, description="source=synthetic: share of the people to forget")
    holdout_fraction: Fraction = Field(0.1, description="source=synthetic: share of the people held out (never "
                                       "trained on: the non-members of membership inference)")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)
    template: Template = Field(default_factory=Template)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    max_length: int = Field(128, ge=8)
    seed: int | None = Field(None, description="seed of the synthetic generator's people and splits; default: the "
                             "experiment's seed. `seeds` repeats the training at each seed on this same data")

    def columns_for(self, split: str) -> dict[str, str]:
        """The column mapping of one split: the mapping for every split, then that split's own."""
        shared = {k: v for k, v in self.columns.items() if isinstance(v, str)}
        own = self.columns.get(split)
        return {**shared, **(own if isinstance(own, dict) else {})}

    @pydantic.model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        problems = []
        if self.source == "synthetic" and self.forget_fraction + self.holdout_fraction >= 1:
            problems.append("forget_fraction + holdout_fraction must be < 1 to leave people to retain")
        if self.source == "hf" and not self.path:
            problems.append("source=hf needs data.path (a hub dataset name or a local dataset directory)")
        if self.source != "hf" and self.revision:
            problems.append(f"data.revision is read by source=hf only, and source is {self.source}; remove it")
        if self.source != "hf" and self.path:
            problems.append(f"data.path is read by source=hf only, and source is {self.source}; remove data.path, "
                            "or name files in data.splits")
        if self.source != "synthetic":
            # Set to other than the default: a resolved config written out (a job spec, config.resolved.json)
            # holds every key, and reads back the same.
            fields = type(self).model_fields
            unused = sorted(k for k in {"synthetic", "forget_fraction", "holdout_fraction"} & self.model_fields_set
                            if getattr(self, k) != fields[k].get_default(call_default_factory=True))
            if unused:
                problems.append(f"data.{', data.'.join(unused)}: read by source=synthetic only, and source is "
                                f"{self.source} (its splits come from data.splits); remove them")
        if self.source in ("hf", "files"):
            missing = [s for s in ("forget", "retain") if s not in self.splits]
            if missing:
                problems.append(f"source={self.source} needs data.splits.{{forget,retain}}; missing: {missing}")
        generated = sorted(set(self.splits) & {*GENERATED_SPLITS, *TEXT_QA_SPLITS})
        if self.source == "synthetic" and generated:
            problems.append(f"data.splits.{generated[0]}: source=synthetic generates {', '.join(GENERATED_SPLITS)} "
                            "itself; name other splits here (extra evaluation sets), or use source=files to bring "
                            "your own forget/retain data")
        for split, spec in self.splits.items():
            if self.source != "hf" and not is_file_spec(spec):
                problems.append(f"splits.{split}: {spec!r} is not one of {sorted(FILE_SUFFIXES)} nor a builtin: set; "
                                "convert it or rename")
        ours = {*QA_COLUMNS, TEXT_COLUMN, *CHOICE_COLUMNS, "entity"}
        for key, value in self.columns.items():
            if isinstance(value, dict):
                if key not in self.splits and key not in GENERATED_SPLITS:
                    problems.append(f"columns.{key}: not a split of data.splits ({', '.join(self.splits) or 'none'}) "
                                    f"nor a column to map ({', '.join(sorted(ours))})")
                unknown = sorted(set(value) - ours)
                if unknown:
                    problems.append(f"columns.{key}: unknown {unknown}; map any of {sorted(ours)}")
            elif key not in ours:
                problems.append(f"columns: unknown {[key]}; map any of {sorted(ours)}, or give a split "
                                "its own mapping as columns.<split>.<column>")
        if self.source == "synthetic" and self.columns and not self.splits:
            problems.append("data.columns maps the columns of data.splits files, and source=synthetic names none; "
                            "remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self
