"""RMU, representation misdirection (Li et al. 2024, WMDP)."""

from __future__ import annotations

import torch

from unlearning.methods import METHODS
from unlearning.methods.logprobs import HiddenStates


def steering_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """u · coeff / ‖u‖ with u uniform in [0, 1)^dim, drawn from `seed`: (1, 1, dim), the same on every
    rank and after every resume."""
    u = torch.rand(1, 1, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm() * coeff).float()


@METHODS.register("rmu", gamma=1.0, alpha=1.0, retain_loss="embed_diff", trains="trainable")
def rmu(forget_hidden: HiddenStates, *, layer: str = "model.layers.7", steering_coeff: float = 2.0,
        trainable: list[str] = [".*"], seed: int = 0) -> torch.Tensor:  # noqa: B006 (read, never mutated)
    """L = mean_b [Σ_t mean_d (h_t − c·u/‖u‖)² / |answer_b|]: the activations of `layer` on the forget
    answer tokens are steered to a fixed random vector of norm c; the retain term (embed_diff) holds the
    retain activations at the reference's. `trainable`: regexes (full match) of the parameters that train.
    Defaults are open-unlearning's configs/trainer/RMU.yaml (its layer suits a 16-layer model).
    """
    target = steering_vector(forget_hidden.states.shape[-1], steering_coeff, seed).to(forget_hidden.states.device)
    return forget_hidden.mean_squared_distance(target)
