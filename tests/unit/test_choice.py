"""Multiple-choice knowledge (WMDP-style): the accuracy metrics on hand-made log-likelihoods as
lm-evaluation-harness defines them, multiple-choice splits from files and from the generator, the harness's
local task files and the checks made before any model is loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.unit.test_metrics import token_scores
from unlearning.config import validate_config
from unlearning.data import synthetic
from unlearning.data.loaders import load_records
from unlearning.errors import UserError
from unlearning.evaluate import harness
from unlearning.evaluate import knowledge as k
from unlearning.evaluate import metrics as m
from unlearning.evaluate.probes import SplitProbes
from unlearning.schema import SyntheticData, Template


def test_acc_is_the_argmax_loglikelihood_and_acc_norm_divides_by_the_options_length_in_characters():
    """lm-evaluation-harness (api/task.py, multiple_choice): acc = [argmax ll == gold], acc_norm = [argmax ll / len
    == gold] with len the option's characters. Item 1: ll (−2, −1), options ('aaaa', 'b'), gold 0: acc picks 1 (0),
    acc_norm compares (−0.5, −1) and picks 0 (1). Item 2: a tie (−1, −1) goes to the first option, gold 1: both 0.
    Item 3: (−3, −0.1, −5), gold 1: both 1."""
    lls = [np.array([-2.0, -1.0]), np.array([-1.0, -1.0]), np.array([-3.0, -0.1, -5.0])]
    options = [["aaaa", "b"], ["x", "y"], ["p", "q", "r"]]
    acc, norm = k.choice_accuracies(lls, options, [0, 1, 1])
    assert acc.tolist() == [0.0, 0.0, 1.0] and norm.tolist() == [1.0, 0.0, 1.0]


def test_the_options_loglikelihoods_come_back_in_their_order_without_the_eos():
    """The right option is scored as `answer`, the others as `perturbed` in order; each option's last token is
    the EOS the encoder appends, which lm-eval does not score: the right option's ll (−1 − 0.5) goes back to its
    index 2, between the others' (−0.25, −3) and after them (−4)."""
    probes = SplitProbes(answer=token_scores([[-1.0, -0.5]]), answers=["c"], generation=[],
                         perturbed=[token_scores([[-0.25, -9.0]]), token_scores([[-3.0, -9.0]]),
                                    token_scores([[-4.0, -9.0]])],
                         choices=[["a", "b", "c", "d"]], answer_index=[2])
    (lls,) = k.option_loglikelihoods(probes)
    assert lls.tolist() == [-0.25, -3.0, -1.0, -4.0]
    out = k.multiple_choice_metric(m.EvalInputs({"forget_choice": probes}))
    assert out["forget_choice_acc"].value == 0.0 and out["forget_choice_acc_norm"].value == 0.0
    # Under any name a multiple-choice split is scored once, by the harness's rules: not also as a TOFU choice set
    # (whose accuracy counts a tie as wrong and takes no option order).
    named = m.EvalInputs({"general": probes})
    assert set(k.multiple_choice_metric(named)) == {"general_acc", "general_acc_norm"}
    assert m.accuracy(named) == {} and not m.scored_as_choice(probes, "general")


def test_a_multiple_choice_split_loads_from_wmdp_like_columns(tmp_path):
    """WMDP and MMLU give `choices` and the right one's index as `answer`: mapped to answer_index, each record
    keeps its options and gets the right one as `answer`, the others as `perturbed_answer`; a row whose index is
    out of range is an error naming it."""
    rows = [{"question": "Which host?", "choices": ["rat", "bat", "cat"], "answer": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "f.jsonl").write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"question": "r?", "answer": "b."}) + "\n")
    raw = {"name": "mc", "data": {"source": "files", "columns": {"forget_choice": {"answer_index": "answer"}},
                                  "splits": {"forget": str(tmp_path / "f.jsonl"), "retain": str(tmp_path / "r.jsonl"),
                                             "forget_choice": str(tmp_path / "mc.jsonl")}}}
    (record,) = load_records(validate_config(raw))["forget_choice"]
    assert record == {"question": "Which host?", "choices": ["rat", "bat", "cat"], "answer_index": 1, "answer": "bat",
                      "perturbed_answer": ["rat", "cat"]}
    (tmp_path / "mc.jsonl").write_text(json.dumps({**rows[0], "answer": 3}) + "\n")
    with pytest.raises(UserError, match=r"row 1: a multiple-choice row needs .* index 3"):
        load_records(validate_config(raw))


def test_the_generator_asks_the_hazardous_and_the_general_domain_as_multiple_choice():
    """format=choice: forget / holdout passages about invented agents, retain about the retained people; each
    *_choice item has 4 options, its value at answer_index, and the passage of its entity states that value."""
    splits = synthetic.generate(SyntheticData(num_entities=20, facts_per_entity=4, format="choice"), 0.2, 0.1, seed=1)
    assert [len(splits[s]) for s in ("forget", "holdout", "retain")] == [4, 2, 14]
    texts = {d["entity"]: d["text"] for s in ("forget", "holdout", "retain") for d in splits[s]}
    for split in ("forget_choice", "holdout_choice", "retain_choice"):
        for item in splits[split]:
            assert len(item["choices"]) == 4 and item["choices"][item["answer_index"]] == item["answer"]
            assert item["answer"] in texts[item["entity"]] and len(set(item["choices"])) == 4
    assert all("laboratory agent" in d["text"] for d in splits["forget"])
    assert all("author" in d["text"] for d in splits["retain"])


def test_a_prepared_split_becomes_a_local_harness_task_in_the_templates_format(tmp_path):
    rows = [{"question": "Which host?", "choices": ["rat", "bat"], "answer_index": 1}]
    harness.write_split_task(rows, "forget_choice", Template(prompt="Q: {question} {{x}}\nA:"), tmp_path)
    task = yaml.safe_load((tmp_path / "forget_choice.yaml").read_text())
    assert task["task"] == "unlearning_forget_choice" and task["output_type"] == "multiple_choice"
    assert task["doc_to_text"] == "Q: {{question}}{% raw %} {x}\nA:{% endraw %}" and task["target_delimiter"] == " "
    assert json.loads((tmp_path / "forget_choice.jsonl").read_text()) == rows[0]
    with pytest.raises(UserError, match="cannot express"):
        harness.write_split_task(rows, "x", Template(answer=" {answer}!"), tmp_path)


def test_harness_tasks_are_checked_before_any_model_is_loaded(pico, monkeypatch):
    cfg = pico(eval={"lm_eval": {"tasks": ["split:forget_choice", "split:retain", "no_such_task"]}})
    problems = harness.harness_problems(cfg, {"forget_choice": 4, "retain": 9}, {"forget_choice"})
    assert any("'retain' is not a prepared multiple-choice split; those are: forget_choice" in p for p in problems)
    assert any("['no_such_task'] are not lm-evaluation-harness tasks" in p for p in problems)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline = harness.harness_problems(pico(eval={"lm_eval": {"tasks": ["mmlu"]}}), {}, set())
    assert len(offline) == 1 and "download their data from the hub, and HF_DATASETS_OFFLINE=1" in offline[0]
