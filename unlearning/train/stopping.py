"""Stopping rules of an unlearning run, checked after every optimizer step on every rank.

Gradient ascent and its relatives are unbounded, so a run needs a rule that ends it before it destroys the
model or overshoots: a bound on the forget NLL, a bound on the method's own loss (absolute, or a fraction
of its first value: KGA's rule, once the knowledge gaps are aligned), a floor on the answer probability of a
fixed retain sample, or the point where the forget set has become indistinguishable from the holdout set
(data the model never saw), which needs no oracle. Every check is computed across the ranks
(`sharded_answer_logprobs`), so every rank takes the same decision; the checks so far are part of the
checkpoint's client state, so a resumed run keeps its history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unlearning.data.encoders import QAEncoder
from unlearning.evaluate.metrics import auc, truth_ratio_of
from unlearning.evaluate.probes import normalised_probability, split_requests
from unlearning.schema import StopConfig
from unlearning.train.reference import mean_probability, sharded_answer_logprobs


class StopRuleError(RuntimeError):
    """A stopping rule that would end the run before its first step (the starting model already meets it)."""


class Collapsed(RuntimeError):
    """The retain probability fell below `train.stop.collapse` × its start: the run failed (see StopConfig)."""


def fixed_sample(rows: Any, size: int, seed: int) -> list[dict[str, Any]]:
    """`size` rows of a split in a seeded order (the same on every rank and on resume)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[:size]]


class StopRules:
    """The configured stopping rules of one run over its model (`module`, the engine's).

    Args:
        stop: the `train.stop` section.
        module: the model being trained.
        splits: the prepared splits (retain for the utility floor, forget and holdout for the holdout match).
        pad_id, batch_size, seed: how the checks batch and which fixed samples they draw.
        state: the client state of a resumed checkpoint (the checks so far), or None.
    """

    def __init__(self, stop: StopConfig, module: Any, splits: Any, *, tokenizer: Any, template: Any, max_length: int,
                 batch_size: int, seed: int, state: dict[str, Any] | None = None):
        self.stop, self.module, self.batch_size = stop, module, batch_size
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.pad_id = tokenizer.pad_token_id
        state = state or {}
        self.utility: list[dict[str, float]] = list(state.get("utility", []))
        self.holdout: list[dict[str, float]] = list(state.get("holdout", []))
        self.first_loss: float | None = state.get("first_forget_loss")
        self.retain = fixed_sample(splits["retain"], stop.utility_sample, seed) \
            if self.checks_utility else []
        if stop.holdout_match is not None:
            self.forget = fixed_sample(splits["forget"], stop.holdout_sample, seed + 1)
            self.heldout = fixed_sample(splits["holdout"], stop.holdout_sample, seed + 2)

    @property
    def checks_utility(self) -> bool:
        """Whether a rule reads the retain sample's probability (the utility floor, the collapse check)."""
        return self.stop.utility_floor is not None or self.stop.collapse is not None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the checks."""
        return {"utility": self.utility, "holdout": self.holdout, "first_forget_loss": self.first_loss}

    def start(self) -> None:
        """The checks before the first step: a rule the starting model already meets is a configuration error."""
        stop = self.stop
        if self.checks_utility:
            p0 = self._check_utility(0)
            if stop.utility_floor is not None and p0 < stop.utility_floor:
                raise StopRuleError(f"train.stop.utility_floor={stop.utility_floor} is above the starting model's "
                                    f"retain probability {p0:.4f}: the run would stop at once; lower the floor")
        if stop.holdout_match is not None:
            value, met = self._check_holdout(0)
            if met:
                raise StopRuleError(
                    f"train.stop.holdout_match={stop.holdout_match}: the starting model already treats the forget set "
                    f"like the holdout set ({stop.holdout_match} {value:.4f}); it has nothing to unlearn that this "
                    "rule can see: check that the target learned the forget set, or lower train.stop.holdout_margin")

    def after(self, record: dict[str, float]) -> str | None:
        """The name of the first rule that ends the run after this step's `record`, or None."""
        stop, step = self.stop, int(record["step"])
        if stop.forget_loss_bound is not None and record["forget_nll"] >= stop.forget_loss_bound:
            return "forget_loss_bound"
        if self.first_loss is None:
            self.first_loss = record["forget_loss"]
        if stop.forget_loss_below is not None and record["forget_loss"] <= stop.forget_loss_below:
            return "forget_loss_below"
        if stop.forget_loss_fraction is not None:
            if self.first_loss <= 0:
                raise StopRuleError(f"train.stop.forget_loss_fraction needs a positive forget loss to take a fraction "
                                    f"of, and the first step's is {self.first_loss:.4g}; use forget_loss_below")
            if record["forget_loss"] <= stop.forget_loss_fraction * self.first_loss:
                return "forget_loss_fraction"
        if self.checks_utility and step % stop.utility_every == 0:
            p = self._check_utility(step)
            start = self.utility[0]["retain_probability"]
            if stop.collapse is not None and p < stop.collapse * start:
                raise Collapsed(f"the retain probability fell from {start:.4f} to {p:.2e} by step {step}, below "
                                f"train.stop.collapse={stop.collapse:g} of its start: the model is destroyed. Lower "
                                "train.lr, or end the run earlier (train.max_steps, train.stop.utility_floor); "
                                "train.stop.collapse=null allows it")
            if stop.utility_floor is not None and p < stop.utility_floor:
                return "utility_floor"
        if stop.holdout_match is not None and step % stop.holdout_every == 0 and self._check_holdout(step)[1]:
            return "holdout_match"
        return None

    def _check_utility(self, step: int) -> float:
        p = mean_probability(self.module, self.retain, pad_id=self.pad_id, batch_size=self.batch_size)
        self.utility.append({"step": step, "retain_probability": p})
        return p

    def _check_holdout(self, step: int) -> tuple[float, bool]:
        stop = self.stop
        forget, holdout = (self._probabilities(rows) for rows in (self.forget, self.heldout))
        record = {"step": step, "forget_probability": float(forget.mean()),
                  "holdout_probability": float(holdout.mean())}
        if stop.holdout_match == "auc":
            value = auc(forget, holdout)  # the LOSS attack (the probability is monotone in the mean token NLL)
            met = value <= 0.5 + stop.holdout_margin
        elif stop.holdout_match == "probability":
            value = float(forget.mean())
            met = value <= float(holdout.mean()) + stop.holdout_margin
        else:  # the forget truth ratios should look like those of facts the model never saw
            value = auc(*(self._truth_ratios(rows) for rows in (self.forget, self.heldout)))
            met = abs(value - 0.5) <= stop.holdout_margin
        self.holdout.append({**record, str(stop.holdout_match): value})
        return value, met

    def _probabilities(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        logp, ntok = sharded_answer_logprobs(self.module, rows, pad_id=self.pad_id, batch_size=self.batch_size)
        return normalised_probability(logp, ntok)

    def _truth_ratios(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Per row TR as the evaluation computes it (`metrics.split_truth_ratio`), in one sharded scoring pass."""
        seqs, plan = split_requests(rows, QAEncoder(self.tokenizer, self.template, self.max_length))
        logp, ntok = sharded_answer_logprobs(self.module, seqs, pad_id=self.pad_id, batch_size=self.batch_size)
        base = plan["paraphrased"] if plan["paraphrased"] is not None else plan["answer"]
        return truth_ratio_of(logp[base], ntok[base], [(logp[ix], ntok[ix]) for ix in plan["perturbed"]])
