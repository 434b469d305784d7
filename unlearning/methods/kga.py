"""KGA, knowledge gap alignment (Wang et al. 2023, ACL: the alignment loss, the retain KL and the stop rule).

Two auxiliary models come from the base by the target's own recipe: A_f, fine-tuned on the forget set D_f, and
A_n, fine-tuned on new data D_n that the target never saw. The knowledge gap of A_D (the target) and A_n on D_n
is what "never trained on it" looks like; the student A*, starting at A_D, is trained until its gap to A_f on
D_f is the same.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearning.methods import METHODS
from unlearning.methods.answers import answer_tokens_of
from unlearning.methods.logprobs import AnswerTokens


def auxiliary(params: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The models the build stage fine-tunes for KGA, by their training splits: `aux` (A_f, read live by the
    ranks) and `new` (A_n, read once for the constants)."""
    return {"aux": ("forget",), "new": (str(params["new_data"]),)}


@torch.no_grad()
def new_data_gaps(target: Any, models: dict[str, Any], splits: Any, *, pad_id: int, batch_size: int, seed: int,
                  new_data: str, **_: Any) -> torch.Tensor:
    """(N_forget,) the knowledge gap paired with each forget item: KL(A_n ‖ A_D) averaged over the answer tokens of
    one item of the `new_data` split, the items drawn for the forget items in a seeded order (cycled when there
    are fewer). `models["new"]` is A_n; `target` is A_D."""
    from unlearning.data.tokenize import collate

    new = list(splits[new_data])
    device = next(target.parameters()).device
    gaps = []
    for start in range(0, len(new), batch_size):
        batch = {k: v.to(device) for k, v in collate(new[start:start + batch_size], pad_id).items()}
        fixed = answer_tokens_of(models["new"], batch, pack=False)
        student = answer_tokens_of(target, batch, pack=False)
        gaps.append(student.sequence_means(student.kl_from(fixed)).cpu())
    order = torch.randperm(len(new), generator=torch.Generator().manual_seed(seed))
    return torch.cat(gaps)[order[torch.arange(len(splits["forget"])) % len(new)]]


@METHODS.register("kga", gamma=1.0, alpha=0.3, retain_loss="kl", auxiliary=auxiliary, constants=new_data_gaps)
def kga(forget_tokens: AnswerTokens, aux_forget_tokens: AnswerTokens, forget_const: torch.Tensor, *,
        new_data: str = "holdout") -> torch.Tensor:
    """L_a = mean_i |KL(A_f ‖ A*)(x_i) − KL(A_n ‖ A_D)(x'_i)|: each forget item x_i's gap between the student
    and A_f, minus the gap of its paired new item x'_i (`forget_const`, computed before training by
    `new_data_gaps`), each KL averaged over the item's answer tokens. The retain term (kl, α = 0.3 as the
    reference code's generation recipe) keeps the student at A_D on the retain set. `new_data`: the split D_n.

    Differs from the reference code (KGAUnlearn's kga_generation.py), which takes |mean − mean| over a forget
    batch and an unpaired new batch with KLs summed over every position: the paper's per-pair absolute value is
    kept here (a mean over items, so the same for any split of a step into ranks), with token means, so that
    items of different lengths compare and α weighs the two terms as the reference's per-token sums do.
    Shapes: the tokens (M, V), forget_const (B,).
    """
    student_gap = forget_tokens.sequence_means(forget_tokens.kl_from(aux_forget_tokens))  # (B,)
    return (student_gap - forget_const.to(student_gap)).abs().mean()
