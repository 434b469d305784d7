import pytest

from unlearning.data.synthetic import FACT_KINDS, generate, split_counts
from unlearning.errors import UserError
from unlearning.schema import SyntheticData

CFG = SyntheticData(num_entities=40, facts_per_entity=5, num_utility=12)


def test_same_seed_same_data_other_seed_other_data():
    assert generate(CFG, 0.1, 0.2, seed=3) == generate(CFG, 0.1, 0.2, seed=3)
    assert generate(CFG, 0.1, 0.2, seed=3) != generate(CFG, 0.1, 0.2, seed=4)


def test_splits_are_by_person_and_never_overlap():
    splits = generate(CFG, 0.1, 0.2, seed=0)
    people = {s: {r["entity"] for r in splits[s]} for s in ("forget", "retain", "holdout")}
    assert (len(people["forget"]), len(people["holdout"]), len(people["retain"])) == (4, 8, 28)
    assert not people["forget"] & people["retain"]
    assert not people["forget"] & people["holdout"]
    assert not people["retain"] & people["holdout"]
    questions = {s: {r["question"] for r in splits[s]} for s in people}
    assert not questions["forget"] & questions["retain"]
    assert all(len(splits[s]) == 5 * len(people[s]) for s in people)
    assert len(splits["world_facts"]) == 12


def test_every_item_has_paraphrases_and_distinct_wrong_answers():
    for split, rows in generate(CFG, 0.1, 0.2, seed=1).items():
        for r in rows:
            assert r["paraphrased_question"] != r["question"], split
            assert r["paraphrased_answer"] != r["answer"]
            wrong = r["perturbed_answer"]
            assert len(wrong) == 3 and len(set(wrong)) == 3
            assert r["paraphrased_answer"] not in wrong


def test_sentence_style_restates_the_name_and_short_style_does_not():
    short = generate(CFG, 0.1, 0.2, seed=0)["forget"][0]
    sentence = generate(CFG.model_copy(update={"answer_style": "sentence"}), 0.1, 0.2, seed=0)["forget"][0]
    assert short["entity"] not in short["answer"]
    assert sentence["entity"] in sentence["answer"]
    assert short["question"] == sentence["question"]


def test_facts_per_person_are_distinct_kinds():
    rows = generate(SyntheticData(num_entities=10, facts_per_entity=len(FACT_KINDS)), 0.1, 0.1, 0)["retain"]
    per_person: dict[str, list[str]] = {}
    for r in rows:
        per_person.setdefault(r["entity"], []).append(r["kind"])
    assert all(sorted(k) == sorted(f.name for f in FACT_KINDS) for k in per_person.values())


def test_empty_splits_are_reported_before_generating():
    with pytest.raises(UserError, match="selects nobody to forget"):
        split_counts(10, 0.01, 0.2)
    with pytest.raises(UserError, match="leaves no holdout"):
        generate(SyntheticData(num_entities=10), 0.2, 0.01, seed=0)
