"""The experiment: every section together, plus how `unlearn run` orchestrates and sequences it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from unlearning.schema.base import PositiveFloat, Strict, no_repeats
from unlearning.schema.data import DataConfig
from unlearning.schema.evaluation import AttackConfig, EvalConfig, TrackingConfig
from unlearning.schema.training import MergeConfig, MethodConfig, ModelConfig, TrainConfig

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
