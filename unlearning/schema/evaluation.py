"""The eval, tracking and attack sections: what is measured, where it is logged, what it must survive."""

from __future__ import annotations

import os
import re
from typing import Literal

import pydantic
from pydantic import Field

from unlearning.schema.base import PositiveFloat, Strict, no_repeats

EVAL_ROLES = ("target", "oracle", "unlearned", "merged")


class LmEvalConfig(Strict):
    """lm-evaluation-harness run on every evaluated checkpoint (`unlearning/evaluate/harness.py`)."""

    tasks: list[str] = Field(default_factory=list, description="the harness's tasks (wmdp_bio, mmlu, ...: from the "
                             "hub) or split:<name> for a prepared multiple-choice split (a local task); empty: none")
    include_path: str | None = Field(None, description="a folder of further task YAML files")
    num_fewshot: int | None = Field(None, ge=0, description="default: each task's own")
    limit: int | None = Field(None, ge=1, description="at most this many documents per task (a smoke run)")
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=8, description="the context the harness truncates to; default: the "
                                   "model's")


class EvalConfig(Strict):
    suite: str = Field("tofu", description="tofu | muse | wmdp | quick (unlearning/evaluate/suites.py)")
    models: list[str] = Field(
        default_factory=lambda: list(EVAL_ROLES),
        description="what `unlearn eval` and `unlearn run` evaluate: roles (target, oracle; unlearned = one "
                    "model per method; merged = one model per merge.lambdas value; built or reused) and "
                    "LABEL=PATH checkpoints; forget quality and PrivLeak are measured against the oracle")
    splits: list[str] | None = Field(None, description="prepared splits to evaluate; default: all of them")
    utility_splits: list[str] = Field(default_factory=lambda: ["real_authors", "world_facts"],
                                      description="splits that enter model utility beside retain, when present")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1, description="greedy tokens per answer, and per VerbMem continuation")
    verbmem_prefix: int = Field(32, ge=1, description="VerbMem on a text split: the first this many tokens of each "
                                "chunk are the prompt, and the model's greedy continuation is compared with the "
                                "next max_new_tokens (MUSE: 32 and 128)")
    max_items: dict[str, int] = Field(default_factory=dict, description="split -> at most this many items "
                                      "evaluated: a fixed sample, the same for every model (TOFU evaluates 300 "
                                      "items of its retain set), e.g. {retain: 150}")
    context_length: int | None = Field(None, ge=8, description="the most tokens an in-context method's context, "
                                       "question and answer may take (demonstrations past it are dropped, the "
                                       "answer never); default: the model's max_position_embeddings")
    snapshots: bool = Field(True, description="evaluate the models an unlearning run saved every "
                            "train.snapshot_every steps too, labelled <method>@step<N>")
    references: list[str] = Field(default_factory=list, description="labels of eval.models shown for comparison "
                                  "but never picked as the report's best, as target and oracle are (e.g. the "
                                  "untouched base model: base=PATH)")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)

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
