"""The rank-aware sampler: disjoint ranks, layout-invariant steps, resumable, exact step normalisers."""

import pytest
import torch

from unlearning.methods.logprobs import IGNORE_INDEX
from unlearning.train.sampler import Layout, Stream, micro_batches, step_items


def rows(n: int) -> list[dict]:
    # Example i has a 2-token prompt and i % 3 + 1 answer tokens, so token counts differ between items.
    out = []
    for i in range(n):
        answer = [10 + i] * (i % 3 + 1)
        out.append({"input_ids": [1, 2, *answer], "labels": [IGNORE_INDEX, IGNORE_INDEX, *answer],
                    "attention_mask": [1] * (2 + len(answer))})
    return out


def take(stream: Stream, layout: Layout, rank: int, steps: int, start: int = 0) -> list[dict]:
    it = micro_batches({"forget": stream}, layout, rank=rank, seed=7, pad_id=0, start_step=start)
    return [next(it)["forget"] for _ in range(steps * layout.accum)]


def test_ranks_draw_disjoint_items_and_together_cover_the_step():
    stream, layout = Stream(rows(20), "forget"), Layout(micro=2, world=2, accum=2)
    r0, r1 = take(stream, layout, 0, 1), take(stream, layout, 1, 1)
    got0 = [i for b in r0 for i in b["index"].tolist()]
    got1 = [i for b in r1 for i in b["index"].tolist()]
    assert not set(got0) & set(got1)
    assert sorted(got0 + got1) == sorted(step_items(20, layout, 7, "forget", 0))


def test_a_step_holds_the_same_items_however_the_global_batch_is_split():
    n = 24
    layouts = [Layout(8, 1, 1), Layout(4, 2, 1), Layout(2, 2, 2), Layout(1, 4, 2)]
    for step in range(5):  # crosses an epoch boundary (3 steps per epoch)
        sets = [set(step_items(n, lay, 7, "forget", step)) for lay in layouts]
        assert all(s == sets[0] for s in sets) and len(sets[0]) == 8
    assert step_items(n, layouts[0], 7, "forget", 0) != step_items(n, layouts[0], 7, "retain", 0)


def test_step_normalisers_average_to_the_global_token_mean():
    """Σ over micro-batches of Σ tokens / answer_norm = number of micro-batches × (global mean weight 1)."""
    stream, layout = Stream(rows(16), "forget"), Layout(micro=2, world=2, accum=2)
    batches = take(stream, layout, 0, 1) + take(stream, layout, 1, 1)
    total = sum(stream.answer_tokens[b["index"]].sum() for b in batches)
    for b in batches:
        assert b["answer_norm"].item() == pytest.approx(total.item() / 4)
    # each item's answer_tokens counts the shifted labels: example i has i % 3 + 1 answer tokens
    assert stream.answer_tokens[:3].tolist() == [1.0, 2.0, 3.0]


def test_resuming_at_a_step_continues_the_same_sequence():
    stream, layout = Stream(rows(20), "forget"), Layout(micro=2, world=2, accum=1)
    whole = take(stream, layout, 1, 6)
    resumed = take(stream, layout, 1, 2, start=4)
    for a, b in zip(whole[4:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_too_few_items_for_one_global_batch_is_an_error():
    with pytest.raises(ValueError, match="cannot fill a global batch of 8"):
        step_items(5, Layout(2, 2, 2), 0, "forget", 0)
