"""The model, method, train and merge sections: what is built, unlearned and merged, and how."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from unlearning.schema.base import PositiveFloat, Strict


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
    retain_loss: str | None = None  # a registered retain term (methods/retain.py) or "none"

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
    forget_loss_below: float | None = Field(None, description="stop once the method's forget loss (this step's, "
                                            "averaged over the ranks) is at most this: KGA's stop_value")
    forget_loss_fraction: float | None = Field(None, gt=0, lt=1, description="stop once the method's forget loss is "
                                               "at most this fraction of its first step's (which must be positive): "
                                               "KGA's stop_portion")
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
