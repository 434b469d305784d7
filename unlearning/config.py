"""Experiment configuration: one flat YAML per experiment, validated before anything expensive runs.

`load_config(path, overrides)` reads the YAML, applies `KEY=VALUE` overrides (values parsed as YAML, so
`train.lr=1e-5`, `merge.lambdas=[1,5]`, `model.target=null` work), validates every section with pydantic
(unknown keys rejected, with the valid keys listed) and the method's parameters against the method
registry, and returns the resolved `ExperimentConfig`, or raises one `UserError` listing every problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from unlearning.errors import UserError

Fraction = Annotated[float, Field(gt=0, lt=1, description="a fraction strictly between 0 and 1")]
PositiveFloat = Annotated[float, Field(gt=0)]
QA_COLUMNS = ("question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer", "cloze",
              "cloze_answer", "cloze_wrong")
LIST_COLUMNS = ("perturbed_answer", "cloze_wrong")  # lists of strings; the others are text
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class SyntheticData(Strict):
    """Built-in generator of fictitious people and facts (TOFU schema)."""

    num_entities: int = Field(100, ge=3, description="invented people; split by person")
    facts_per_entity: int = Field(6, ge=1, le=10, description="QA pairs per person (at most 10 kinds)")
    num_perturbed: int = Field(3, ge=3, description="wrong answers of the same type per item")
    num_utility: int = Field(30, ge=0, description="general (world) facts kept in every training set")
    answer_style: Literal["short", "sentence"] = Field(
        "short", description="short: the value ('Drulzeath.'); sentence: 'X was born in Drulzeath.'")


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


def is_file_spec(spec: str) -> bool:
    """Whether a `data.splits` entry names a file (JSONL/CSV/Parquet, or a packaged `builtin:` set) rather than a
    config of a `datasets` source."""
    return spec.startswith(BUILTIN_PREFIX) or Path(spec).suffix.lower() in FILE_SUFFIXES


class DataConfig(Strict):
    source: Literal["synthetic", "hf", "files"] = "synthetic"
    path: str | None = Field(None, description="source=hf: a hub dataset name or a local dataset path")
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
        if self.source != "hf" and self.path:
            problems.append(f"data.path is read by source=hf only, and source is {self.source}; remove data.path, "
                            "or name files in data.splits")
        if self.source != "synthetic":
            unused = sorted({"synthetic", "forget_fraction", "holdout_fraction"} & self.model_fields_set)
            if unused:
                problems.append(f"data.{', data.'.join(unused)}: read by source=synthetic only, and source is "
                                f"{self.source} (its splits come from data.splits); remove them")
        if self.source in ("hf", "files"):
            missing = [s for s in ("forget", "retain") if s not in self.splits]
            if missing:
                problems.append(f"source={self.source} needs data.splits.{{forget,retain}}; missing: {missing}")
        generated = sorted(set(self.splits) & set(GENERATED_SPLITS))
        if self.source == "synthetic" and generated:
            problems.append(f"data.splits.{generated[0]}: source=synthetic generates {', '.join(GENERATED_SPLITS)} "
                            "itself; name other splits here (extra evaluation sets), or use source=files to bring "
                            "your own forget/retain data")
        for split, spec in self.splits.items():
            if self.source != "hf" and not is_file_spec(spec):
                problems.append(f"splits.{split}: {spec!r} is not one of {sorted(FILE_SUFFIXES)} nor a builtin: set; "
                                "convert it or rename")
        ours = {*QA_COLUMNS, "entity"}
        for key, value in self.columns.items():
            if isinstance(value, dict):
                if key not in self.splits and key not in GENERATED_SPLITS:
                    problems.append(f"columns.{key}: not a split of data.splits ({', '.join(self.splits) or 'none'}) "
                                    f"nor a column to map ({', '.join(sorted(ours))})")
                unknown = sorted(set(value) - ours)
                if unknown:
                    problems.append(f"columns.{key}: unknown {unknown}; map any of {[*QA_COLUMNS, 'entity']}")
            elif key not in ours:
                problems.append(f"columns: unknown {[key]}; map any of {[*QA_COLUMNS, 'entity']}, or give a split "
                                "its own mapping as columns.<split>.<column>")
        if self.source == "synthetic" and self.columns and not self.splits:
            problems.append("data.columns maps the columns of data.splits files, and source=synthetic names none; "
                            "remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TinyModel(Strict):
    """A Llama-architecture model built from a config with random weights (the embedded default)."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = None
    intermediate_size: int = Field(512, ge=8)
    tie_embeddings: bool = False

    @pydantic.model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        return self


class Finetune(Strict):
    """Recipe that builds both the target (forget ∪ retain ∪ world facts) and the oracle (retain ∪ world facts)."""

    epochs: int = Field(30, ge=1)
    lr: PositiveFloat = 2e-3
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int | None = Field(None, description="initialisation and data-order seed; default: the experiment's "
                             "seed (another seed on the same data gives a second oracle to calibrate against)")


class ModelConfig(Strict):
    base: str = Field("tiny", description="'tiny' (built from model.tiny) or any HF causal LM name or path")
    tiny: TinyModel = Field(default_factory=TinyModel)
    target: str | None = Field(None, description="existing target checkpoint; skips building it")
    oracle: str | None = Field(None, description="existing retain-oracle checkpoint; skips building it")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    finetune: Finetune = Field(default_factory=Finetune)


class MethodConfig(BaseModel):
    """`name` plus the method's own parameters (its keyword-only arguments, checked by the registry).

    `gamma` and `alpha` weigh the forget and retain losses, `retain_loss` picks the retain term; left
    empty they take the method's registered defaults, which the resolved config then shows.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = "graddiff"
    gamma: float | None = Field(None, ge=0)
    alpha: float | None = Field(None, ge=0)
    retain_loss: Literal["nll", "kl", "none"] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class StopConfig(Strict):
    """Gradient ascent is unbounded: besides `train.max_steps`, stop once the forget answers' mean token NLL
    reaches `forget_loss_bound`, once the mean answer probability on a fixed retain sample falls below
    `utility_floor` (checked every `utility_every` steps, so the overshoot is at most that many steps), or once
    the forget set has become indistinguishable from the holdout set (`holdout_match`), which needs no oracle:
    a model that never saw the forget set treats it like any unseen data."""

    forget_loss_bound: float | None = Field(None, gt=0, description="stop once the forget NLL reaches this")
    utility_floor: float | None = Field(None, gt=0, le=1, description="stop once retain probability is below")
    collapse: float | None = Field(0.01, gt=0, lt=1, description="fail the run (an error, not a stop: the model is "
                                   "destroyed) once the retain sample's probability falls below this fraction of "
                                   "the starting model's (e.g. after too high an lr), checked every utility_every "
                                   "steps; null: never")
    utility_every: int = Field(5, ge=1, description="steps between utility-floor and collapse checks")
    utility_sample: int = Field(32, ge=1, description="retain examples the utility-floor check scores")
    holdout_match: Literal["auc", "probability", "truth_ratio"] | None = Field(
        None, description="stop once forget and holdout answers are indistinguishable on a fixed sample of each: "
        "auc: the LOSS-attack ROC AUC (forget = members) is at most 0.5 + holdout_margin; probability: the mean "
        "forget answer probability is at most the holdout's + holdout_margin; truth_ratio: the truth ratios (what "
        "forget quality compares) of the two samples are within holdout_margin of an AUC of 0.5 (needs perturbed "
        "answers)")
    holdout_margin: float = Field(0.05, ge=0, lt=0.5, description="how close to indistinguishable counts")
    holdout_every: int = Field(5, ge=1, description="steps between holdout-match checks")
    holdout_sample: int = Field(64, ge=2, description="forget and holdout examples each holdout check scores")


class TrainConfig(Strict):
    """Unlearning run: DeepSpeed engine, schedule and stopping rules."""

    lr: PositiveFloat = 1e-4
    max_steps: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1, description="micro-batch per rank")
    grad_accum: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1, description="ranks per node")
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = None
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "optimizer", "all"] = "none"
    bf16: bool = False
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="the learning rate after warm-up: cosine "
                                                    "decay to zero at max_steps, or constant (then the first k steps "
                                                    "of a run are a k-step run, which its snapshots reuse)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    packing: bool = Field(True, description="run a micro-batch as one row without padding where the model keeps "
                          "packed sequences apart (checked at start) and it saves work; same losses up to rounding")
    checkpoint_every: int = Field(0, ge=0, description="steps between DeepSpeed checkpoints; 0: only at end")
    snapshot_every: int = Field(0, ge=0, description="steps between HF models of the run saved under snapshots/"
                                "step<N>/, which `unlearn eval` and `unlearn run` evaluate beside the final one "
                                "(eval.snapshots) so the best point of training shows; 0: none")
    snapshot_steps: list[int] = Field(default_factory=list, description="further steps to save such a snapshot "
                                      "at (the attack stage's relearning saves each k of attack.relearn.steps)")
    timeout_s: PositiveFloat | None = Field(None, description="wall-clock limit of the training job: past it every "
                                            "rank is stopped, checkpoints kept; rerun to resume")
    keep_checkpoints: int = Field(2, ge=1, description="newest DeepSpeed checkpoints kept on disk")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    stop: StopConfig = Field(default_factory=StopConfig)

    @pydantic.model_validator(mode="after")
    def _offload_does_something(self) -> TrainConfig:
        # DeepSpeed accepts these silently, and they offload nothing.
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError("offload needs ZeRO: set zero_stage to 1, 2 or 3 (stage 0 offloads nothing)")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(f"offload=all offloads parameters, which only ZeRO-3 partitions; set zero_stage=3 "
                             f"or offload=optimizer (zero_stage is {self.zero_stage})")
        return self


class ForgetFinetune(Strict):
    """The fine-tune on the forget set whose weight change is the task vector τ (run by the training engine)."""

    lr: PositiveFloat = 1e-4
    max_steps: int = Field(20, ge=1)
    lora: bool = Field(False, description="fine-tune a LoRA adapter (train.lora.r/alpha/target_modules) and "
                       "negate scale·B·A, never materialising a second full model in the merge")


class MergeConfig(Strict):
    method: str = Field("task_arithmetic", description="registered merge (unlearning/merge/streaming.py)")
    lambdas: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0], min_length=1,
                                 description="one merged model θ_target − λ·τ per value")
    finetune: ForgetFinetune = Field(default_factory=ForgetFinetune)
    shard_size_mb: int = Field(2000, ge=1, description="largest output shard")
    chunk_mb: int = Field(16, ge=1, description="rows read and merged at a time; the merge holds ~5 chunks")


EVAL_ROLES = ("target", "oracle", "unlearned", "merged")


class EvalConfig(Strict):
    suite: str = Field("tofu", description="tofu | muse | quick (unlearning/evaluate/suites.py)")
    models: list[str] = Field(
        default_factory=lambda: list(EVAL_ROLES),
        description="what `unlearn eval` and `unlearn run` evaluate: roles (target, oracle; unlearned = one "
                    "model per method; merged = one model per merge.lambdas value; built or reused) and "
                    "LABEL=PATH checkpoints; forget quality and PrivLeak are measured against the oracle")
    splits: list[str] | None = Field(None, description="prepared splits to evaluate; default: all of them")
    utility_splits: list[str] = Field(default_factory=lambda: ["real_authors", "world_facts"],
                                      description="splits that enter model utility beside retain, when present")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    max_items: dict[str, int] = Field(default_factory=dict, description="split -> at most this many items "
                                      "evaluated: a fixed sample, the same for every model (TOFU evaluates 300 "
                                      "items of its retain set), e.g. {retain: 150}")
    snapshots: bool = Field(True, description="evaluate the models an unlearning run saved every "
                            "train.snapshot_every steps too, labelled <method>@step<N>")
    references: list[str] = Field(default_factory=list, description="labels of eval.models shown for comparison "
                                  "but never picked as the report's best, as target and oracle are (e.g. the "
                                  "untouched base model: base=PATH)")

    @pydantic.field_validator("max_items")
    @classmethod
    def _positive_caps(cls, caps: dict[str, int]) -> dict[str, int]:
        low = sorted(s for s, n in caps.items() if n < 2)
        if low:
            raise ValueError(f"{low}: evaluate at least 2 items of a split, or leave it out")
        return caps

    @pydantic.field_validator("models")
    @classmethod
    def _check_models(cls, models: list[str]) -> list[str]:
        problems = []
        for m in models:
            label, sep, path = m.partition("=")
            if sep and not (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label) and path):
                problems.append(f"{m!r}: write LABEL=PATH with a plain label, e.g. oracle2=runs/x/models/oracle-…")
            elif not sep and m not in EVAL_ROLES:
                problems.append(f"{m!r} is neither a role ({', '.join(EVAL_ROLES)}) nor LABEL=PATH")
        labels = [m.partition("=")[0] for m in models]
        if len(set(labels)) != len(labels):
            problems.append(f"labels repeat in {labels}")
        if problems:
            raise ValueError("; ".join(problems))
        return models

    @pydantic.model_validator(mode="after")
    def _references_are_evaluated(self) -> EvalConfig:
        labels = [m.partition("=")[0] for m in self.models]
        unknown = [r for r in self.references if r not in labels]
        if unknown:
            raise ValueError(f"references {unknown} are not labels of eval.models ({', '.join(labels)}); name "
                             "evaluated models, e.g. models: [..., base=PATH], references: [base]")
        return self


class TrackingConfig(Strict):
    uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db",
                     description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. "
                     "Credentials go in MLFLOW_TRACKING_USERNAME/PASSWORD (or TOKEN), never in the URI; none: no "
                     "tracking")
    experiment: str | None = Field(None, description="MLflow experiment; default: the config's name")
    registered_model: str | None = Field(None, description="Model Registry name for the pipeline's target, oracle "
                                         "and best unlearned model (aliases); default: the config's name")
    register_models: bool = Field(True, description="register those models (their weights are copied to the "
                                  "artifact store)")
    log_models: bool = Field(True, description="log every unlearned checkpoint as an MLflow logged model, an "
                             "output of its unlearn run (its weights are copied to the artifact store once; a "
                             "cached rerun links the same model)")

    @pydantic.field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if not v.strip():
            raise ValueError("is empty; give an MLflow URI (sqlite:///mlflow.db, http://host:5000), or none to run "
                             "without tracking")
        if urlsplit(v).password is not None:
            raise ValueError("holds a password; remove it from the URI and set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD in the environment (configs and run params are logged)")
        return v


def no_repeats(values: list[Any], problem: str) -> list[Any]:
    """`values` unchanged, or a validation error naming them and the `problem` when one repeats."""
    if len(set(values)) != len(values):
        raise ValueError(f"{values} {problem}")
    return values


ATTACKS = ("relearn", "quantize", "choice", "cloze", "paraphrase", "context", "prefix")


class RelearnAttack(Strict):
    """Relearning: fine-tune the attacked model on one half of the forget set (by person) for k steps with the
    training engine, then ask both halves (unlearning/attack.py)."""

    steps: list[int] = Field(default_factory=lambda: [10, 50], min_length=1, description="k values, one fine-tune "
                             "each; 0 evaluates the model untouched")
    lr: PositiveFloat = Field(1e-4, description="the relearning fine-tune's learning rate")
    lora: bool = Field(False, description="relearn through a LoRA adapter (train.lora's r/alpha/modules)")
    batch_size: int | None = Field(None, ge=1, description="micro-batch per rank; default train.batch_size (the "
                                   "relearned half is half the forget set: a global batch must fit in it)")

    @pydantic.field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(k < 0 for k in v):
            raise ValueError(f"{v}: give step counts ≥ 0, e.g. [10, 50]")
        return no_repeats(v, "repeats a step count")


QuantScheme = Literal["none", "int8", "nf4", "fp4"]


def _default_schemes() -> list[QuantScheme]:
    return ["int8", "nf4"]


class QuantizeAttack(Strict):
    schemes: list[QuantScheme] = Field(
        default_factory=_default_schemes, min_length=1, description="bitsandbytes schemes: int8 (LLM.int8), "
        "nf4 / fp4 (4-bit, blocks of 64); none = the weights as saved")


class ContextAttack(Strict):
    facts: int = Field(2, ge=0, description="context: other facts of the same person placed before the question")
    prefix: str = Field("Sure, the answer is", description="prefix: the text the response is begun with (empty: "
                        "the plain question)")


class AttackConfig(Strict):
    """The attack stage (`unlearn attack`, and `unlearn run` after evaluation): does the forgetting survive?
    Every attack is applied to each attacked model and to the oracle alike; robust forget quality compares the
    two after the same attack."""

    attacks: list[Literal[ATTACKS]] = Field(  # type: ignore[valid-type]
        default_factory=list, description=f"any of {', '.join(ATTACKS)}; empty: no attack stage")
    models: list[str] | None = Field(None, description="labels of evaluated models to attack (the oracle always "
                                     "is); default: every evaluated model")
    relearn: RelearnAttack = Field(default_factory=RelearnAttack)
    quantize: QuantizeAttack = Field(default_factory=QuantizeAttack)
    context: ContextAttack = Field(default_factory=ContextAttack)
    generations: bool = Field(True, description="greedy answers to the attacked forget questions (ROUGE); off: "
                              "scores only")

    @pydantic.field_validator("attacks")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return no_repeats(v, "names an attack twice")


Stage = Literal["prepare", "build", "unlearn", "merge", "eval", "attack"]


class PipelineConfig(Strict):
    """How `unlearn run` orchestrates the stages (Prefect): retries of I/O-bound work, per-stage time limits."""

    retries: int = Field(2, ge=0, description="retries of I/O-bound tasks (data loading)")
    retry_delay_s: float = Field(5.0, ge=0)
    timeout_s: dict[Stage, PositiveFloat] = Field(
        default_factory=dict, description="stage -> seconds; a stage past its limit fails the run (the training "
        "job's own limit is train.timeout_s, which stops its ranks cleanly)")
    cache: bool = Field(True, description="skip a stage whose inputs (config section + upstream fingerprints) "
                        "match a finished run's; results persisted under <output_dir>/.prefect")


class SequenceConfig(Strict):
    """`unlearn sequence`: forget requests applied one after another, each starting from the last result."""

    requests: int | list[list[str]] = Field(
        3, description="N: the forget set's entities in N ordered groups; or a list of requests, each a list of "
        "entity names from the forget set")

    @pydantic.field_validator("requests")
    @classmethod
    def _check_requests(cls, v: int | list[list[str]]) -> int | list[list[str]]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        if isinstance(v, list) and (not v or not all(v)):
            raise ValueError("every request must name at least one entity")
        return v


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, description="seed of model initialisation, data order and sampling (and of the data, unless "
                      "data.seed is set)")
    seeds: list[int] = Field(default_factory=list, description="repeat the whole run at each of these seeds, each "
                             "with its own target, oracle and unlearning runs, on the data of data.seed (default: "
                             "`seed`); the report gives the median and range over seeds")
    output_dir: str | None = Field(None, description="default: runs/<name>")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    methods: list[dict[str, Any]] = Field(
        default_factory=list, description="several unlearning runs, replacing `method`: each entry a method "
        "section (name and parameters) with an optional `label` (default: the name) and `train` overrides")
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def data_seed(self) -> int:
        """The seed the data is generated and split with."""
        return self.seed if self.data.seed is None else self.data.seed

    @pydantic.model_validator(mode="after")
    def _attack_needs_oracle(self) -> ExperimentConfig:
        if self.attack.attacks and "oracle" not in [m.partition("=")[0] for m in self.eval.models]:
            raise ValueError("attack.attacks needs the oracle in eval.models: robust forget quality compares each "
                             "attacked model with the oracle under the same attack")
        return self

    @pydantic.field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        return no_repeats(v, "repeats a seed; list each seed once")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Turn `a.b.c=value` strings into (path, value) pairs, the value parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise UserError(f"override {item!r} is not KEY=VALUE with a dotted key, e.g. train.lr=1e-5")
        parsed.append((key.split("."), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `KEY=VALUE` override set (creating sections as needed)."""
    result = json.loads(json.dumps(raw))
    for path, value in parse_overrides(overrides):
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub)model that `loc`'s parent points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(e: pydantic.ValidationError) -> list[str]:
    problems = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key; valid keys here: {', '.join(_valid_keys(ExperimentConfig, loc))}")
        elif err["type"] == "missing":
            problems.append(f"{key}: required but missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            secret = loc[-1:] == ("uri",)  # a URI with a password is never echoed back
            shown = "" if isinstance(err.get("input"), dict) or secret else f" (got {err.get('input')!r})"
            problems.append(f"{key}: {msg}{shown}")
    return problems


def _resolve_method(raw_method: Any, where: str = "method") -> tuple[dict[str, Any], list[str]]:
    """Validate the method's parameters against its registered function; fill in its defaults."""
    from unlearning.methods import METHODS  # the registry needs torch; import only when validating

    if not isinstance(raw_method, dict):
        return {}, [f"{where}: must be a section with at least `name`"]
    core = {k: raw_method[k] for k in ("name", "gamma", "alpha", "retain_loss") if k in raw_method}
    name = core.get("name", MethodConfig.model_fields["name"].default)
    extra = {k: v for k, v in raw_method.items() if k not in core}
    params, problems = METHODS.validate(name, extra, where=where)
    if problems:
        return {}, problems
    meta = METHODS.get(name).meta
    resolved = {
        "name": name,
        "gamma": core.get("gamma") if core.get("gamma") is not None else meta.get("gamma", 1.0),
        "alpha": core.get("alpha") if core.get("alpha") is not None else meta.get("alpha", 0.0),
        "retain_loss": core.get("retain_loss") or meta.get("retain_loss", "none"),
    }
    return {**resolved, **params}, []


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, section by section (a copy; neither argument is modified)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


RESERVED_LABELS = ("target", "oracle", "unlearned")


def _resolve_methods(raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate each `methods` entry (its method parameters and its `train` overrides); fill in defaults."""
    entries = raw.get("methods") or []
    if not isinstance(entries, list):
        return [], ["methods: must be a list of method sections, e.g. [{name: ga}, {name: npo, beta: 0.1}]"]
    resolved, problems, labels = [], [], []
    for i, entry in enumerate(entries):
        where = f"methods[{i}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a method section (name and parameters) or a method name")
            continue
        entry = dict(entry)
        label = str(entry.pop("label", None) or entry.get("name", MethodConfig.model_fields["name"].default))
        train = entry.pop("train", None) or {}
        method, method_problems = _resolve_method(entry, where)
        problems += method_problems
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label) or label in RESERVED_LABELS or \
                label.startswith("merged_l"):
            problems.append(f"{where}.label: {label!r} must be a plain name other than {', '.join(RESERVED_LABELS)} "
                            "and merged_l…")
        labels.append(label)
        if not isinstance(train, dict):
            problems.append(f"{where}.train: must be a section of train overrides, e.g. {{lr: 1.0e-4}}")
            continue
        # Problems of the merged section that the overrides brought in (the base section's are reported once).
        problems += [f"{where}.{p}" for p in _train_problems(deep_merge(raw.get("train") or {}, train))
                     if p not in _train_problems(raw.get("train") or {})]
        resolved.append({"label": label, **method, "train": train})
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        problems.append(f"methods: labels {repeated} repeat; give each entry its own `label`")
    return resolved, problems


def _train_problems(train: Any) -> list[str]:
    try:
        ExperimentConfig.model_validate({"name": "check", "train": train})
    except pydantic.ValidationError as e:
        return _format_errors(e)
    return []


def method_runs(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """Label → the config of one unlearning run: `methods` entries, or `method` alone labelled `unlearned`."""
    if not cfg.methods:
        return {"unlearned": cfg}
    runs = {}
    for entry in cfg.methods:
        method = {k: v for k, v in entry.items() if k not in ("label", "train")}
        train = TrainConfig.model_validate(deep_merge(cfg.train.model_dump(), entry.get("train") or {}))
        runs[entry["label"]] = cfg.model_copy(update={"method": MethodConfig(**method), "train": train, "methods": []})
    return runs


def seed_runs(cfg: ExperimentConfig) -> dict[int, ExperimentConfig]:
    """Seed → the config of one repetition: `seeds` each on the data of `data_seed`, or the config alone."""
    if not cfg.seeds:
        return {cfg.seed: cfg}
    data = cfg.data.model_copy(update={"seed": cfg.data_seed})
    return {s: cfg.model_copy(update={"seed": s, "seeds": [], "data": data}) for s in cfg.seeds}


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw config mapping; raise one `UserError` with every problem found."""
    if not isinstance(raw, dict):
        raise UserError("the config must be a YAML mapping of sections (name, data, model, ...)")
    problems: list[str] = []
    method, method_problems = _resolve_method(raw.get("method", {}))
    problems += method_problems
    methods, methods_problems = _resolve_methods(raw)
    problems += methods_problems
    try:
        cfg = ExperimentConfig.model_validate({**raw, **({"method": method} if method else {}),
                                               **({"methods": methods} if methods else {})})
    except pydantic.ValidationError as e:
        problems += _format_errors(e)
        raise UserError(problems) from e
    from unlearning.evaluate.suites import SUITES  # registries: torch is imported already (methods)
    from unlearning.merge.streaming import MERGES

    if cfg.eval.suite not in SUITES:
        problems.append(f"eval.suite: unknown suite {cfg.eval.suite!r}; valid: {', '.join(SUITES)}")
    if cfg.merge.method not in MERGES:
        problems.append(f"merge.method: unknown merge {cfg.merge.method!r}; valid: {', '.join(MERGES.names())}")
    if problems:
        raise UserError(problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply `KEY=VALUE` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML file such as configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from e
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
        check_method_overrides(raw, overrides or [], str(path))
    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw, dict) and raw.get("methods") == []:  # written out, not left to its default
        raise UserError(f"{path}: methods is an empty list, which would run the default method; list the methods to "
                        "run (methods=[{name: npo}]) or remove the key and configure `method`")
    return validate_config(raw)


def check_method_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> None:
    """Refuse `method.*` overrides of a config whose `methods` list would silently ignore them."""
    method_keys = [o for o in overrides if o.split("=", 1)[0].split(".")[0] == "method"]
    if raw.get("methods") and method_keys:
        raise UserError(f"{method_keys[0]} overrides `method`, but {source} lists `methods`, which replace it; "
                        "override the list instead, e.g. 'methods=[{name: npo, alpha: 5.0}]'")


def content_hash(*parts: Any, length: int = 16) -> str:
    """Stable hash of JSON-serialisable parts (sorted keys); used for fingerprints and cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (without the unused `method` section when `methods` replaces it)."""
    resolved = cfg.to_dict()
    if cfg.methods:
        del resolved["method"]
    return yaml.safe_dump(resolved, sort_keys=False)
