"""The clip inside the fused AdamW update equals `clip_grad_norm_` followed by AdamW."""

import pytest
import torch

from unlearning.train.engine import ClippedAdamW, adamw, clips_gradients


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # far below the gradients' norm (clips), far above (does not)
def test_clipped_adamw_equals_clip_then_adamw(max_norm):
    ours, theirs = _model(), _model()
    opt = adamw(list(ours.parameters()), lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    assert isinstance(opt, ClippedAdamW) and clips_gradients(opt)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model in (ours, theirs):
            model.zero_grad()
            (model(x).square().sum() * 10).backward()
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        assert (norm > max_norm) == (max_norm < 1)
        opt.step()
        ref.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_without_a_norm_it_is_plain_fused_adamw():
    opt = adamw(list(_model().parameters()), lr=1e-3)
    assert not clips_gradients(opt) and opt.defaults["fused"]
