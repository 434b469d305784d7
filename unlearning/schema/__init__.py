"""The experiment config's schema: one pydantic model per section, unknown keys refused.

A leaf: it imports pydantic and nothing of the pipeline, so any module may import the sections it reads.
Loading a YAML file, overrides and the checks against the registries (methods, suites, merges) are
`unlearning.config`'s.
"""

from __future__ import annotations

from unlearning.schema.base import Fraction, PositiveFloat, Strict, no_repeats
from unlearning.schema.data import (
    BUILTIN_PREFIX,
    CHOICE_COLUMNS,
    FILE_SUFFIXES,
    GENERATED_SPLITS,
    LIST_COLUMNS,
    QA_COLUMNS,
    TEXT_COLUMN,
    TEXT_QA_SPLITS,
    DataConfig,
    SyntheticData,
    Template,
    TokenizerConfig,
    is_file_spec,
)
from unlearning.schema.evaluation import (
    ATTACKS,
    EVAL_ROLES,
    AttackConfig,
    ContextAttack,
    EvalConfig,
    LmEvalConfig,
    QuantizeAttack,
    QuantScheme,
    RelearnAttack,
    TrackingConfig,
)
from unlearning.schema.experiment import ExperimentConfig, PipelineConfig, SequenceConfig, Stage
from unlearning.schema.training import (
    Finetune,
    ForgetFinetune,
    LoraConfig,
    MergeConfig,
    MethodConfig,
    ModelConfig,
    StopConfig,
    TinyModel,
    TrainConfig,
)

__all__ = [
    "ATTACKS", "BUILTIN_PREFIX", "CHOICE_COLUMNS", "EVAL_ROLES", "FILE_SUFFIXES", "GENERATED_SPLITS", "LIST_COLUMNS",
    "QA_COLUMNS", "TEXT_COLUMN", "TEXT_QA_SPLITS", "AttackConfig", "ContextAttack", "DataConfig", "EvalConfig",
    "ExperimentConfig", "Finetune",
    "ForgetFinetune", "Fraction", "LmEvalConfig", "LoraConfig", "MergeConfig", "MethodConfig", "ModelConfig",
    "PipelineConfig",
    "PositiveFloat", "QuantScheme", "QuantizeAttack", "RelearnAttack", "SequenceConfig", "Stage", "StopConfig",
    "Strict", "SyntheticData", "Template", "TinyModel", "TokenizerConfig", "TrackingConfig", "TrainConfig",
    "is_file_spec", "no_repeats",
]
