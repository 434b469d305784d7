"""The real pretrained model, SmolLM2-135M-Instruct from its GGUF file.

- In the default suite (about a minute and a half on 2 CPU cores): the model itself is the target, NPO runs 4
  steps on 2 DeepSpeed ranks (`unlearn unlearn`, the training engine every run uses), and the saved weights
  load, score the forget answers lower and still answer a real question; ICUL and the instruction baseline
  render through its chat template and evaluate through it.
- Marked slow (`make test-all`; about 9 minutes): the whole pipeline as a user runs it, `unlearn run` (Prefect
  flow, MLflow store): invented authors fine-tuned into it, NPO, TOFU's real-authors and world-facts sets; a
  smaller recipe than configs/smollm2.yaml."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml


def _answers_paris(path) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    return "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_unlearns_on_two_ranks_and_still_answers(smollm2, tmp_path):
    raw = {
        "name": "smollm2-ranks", "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", "forget_fraction": 0.25, "holdout_fraction": 0.25, "max_length": 64,
                 "synthetic": {"num_entities": 8, "facts_per_entity": 2, "num_utility": 0}},
        # The pretrained model is the target (no fine-tune): what it assigns to invented answers is unlearned.
        "model": {"base": str(smollm2), "target": str(smollm2), "oracle": str(smollm2)},
        "method": {"name": "npo", "alpha": 1.0},
        "train": {"lr": 5e-5, "max_steps": 4, "batch_size": 2, "num_processes": 2, "zero_stage": 2},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    exe = Path(sys.executable).parent / "unlearn"
    res = subprocess.run([str(exe), "unlearn", str(tmp_path / "cfg.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = next((tmp_path / "run" / "unlearn").iterdir())
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    p = summary["probability"]
    assert p["unlearned"]["forget"] < p["target"]["forget"]  # NPO lowered the forget answers
    assert _answers_paris(run / "model")


@pytest.mark.slow
def test_smollm2_learns_then_unlearns_invented_authors_and_keeps_real_knowledge(smollm2, tmp_path):
    raw = {
        "name": "smollm2-e2e", "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", "forget_fraction": 0.2, "holdout_fraction": 0.2, "max_length": 96,
                 "synthetic": {"num_entities": 10, "facts_per_entity": 3, "num_utility": 0,
                               "answer_style": "sentence"},
                 "splits": {"real_authors": "builtin:tofu/real_authors", "real_world": "builtin:tofu/world_facts"}},
        "model": {"base": str(smollm2), "finetune": {"epochs": 6, "lr": 1e-4, "batch_size": 8, "warmup_ratio": 0.1}},
        "methods": [{"name": "npo", "alpha": 1.0}],
        "train": {"lr": 1e-4, "max_steps": 6, "batch_size": 3, "num_processes": 2, "zero_stage": 2},
        # The untouched base is the reference: it never saw the invented authors, and it is what SmolLM2 knew.
        "eval": {"suite": "quick", "models": ["target", "unlearned", f"base={smollm2}"], "references": ["base"],
                 "utility_splits": ["real_authors", "real_world"], "batch_size": 32},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "register_models": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    exe = Path(sys.executable).parent / "unlearn"
    res = subprocess.run([str(exe), "run", str(tmp_path / "cfg.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    m = report["metrics"]
    assert m["target"]["forget_probability"] > m["base"]["forget_probability"] + 0.3  # it learned the authors
    assert m["npo"]["forget_probability"] < m["target"]["forget_probability"] - 0.1  # and unlearning lowers them
    # What SmolLM2 knew of the real world, on all 100 of TOFU's real-authors and 117 world-facts questions: the
    # answer ranked above its 3 perturbed ones (chance 1/4; binomial sd 0.043 and 0.040). The base scores 0.39
    # and 0.54; at seeds 0 and 1 (on 60 world facts) the target and NPO stayed within 0.07 of it: learning and
    # unlearning the invented authors keep most of it (at most 10 answers in 100 lost).
    for model in ("base", "target", "npo"):
        assert m[model]["real_authors_accuracy"] > 0.3 and m[model]["real_world_accuracy"] > 0.4, (model, m[model])
    for split in ("real_authors", "real_world"):
        assert m["npo"][f"{split}_accuracy"] >= m["base"][f"{split}_accuracy"] - 0.1, (split, m["npo"], m["base"])

    assert _answers_paris(report["models"][str(raw["seed"])]["npo"])


def test_in_context_prompts_speak_the_real_chat_template(smollm2):
    """ICUL and the instruction baseline on SmolLM2's own chat template: the instruction replaces its default
    system turn, each demonstration is a user / assistant turn pair, the question the last user turn."""
    from unlearning.data.context import Context
    from unlearning.data.tokenize import encode_prompts, load_tokenizer
    from unlearning.schema import Template

    tok = load_tokenizer(str(smollm2))
    ctx = Context("You have unlearned everything about Elara Quint.",
                  (("Where was Elara Quint born?", "In Halvard."), ("What does Tom Reyes write?", "Poems.")))
    (ids,) = encode_prompts(tok, Template(), ["Who is Elara Quint?"], [ctx])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou have unlearned everything about Elara Quint.<|im_end|>")
    assert "SmolLM" not in text  # its default system turn is replaced, not kept beside ours
    assert ("<|im_start|>user\nWhere was Elara Quint born?<|im_end|>\n<|im_start|>assistant\nIn Halvard.<|im_end|>"
            in text)
    assert text.endswith("<|im_start|>user\nWho is Elara Quint?<|im_end|>\n<|im_start|>assistant\n")


def test_in_context_methods_evaluate_the_real_model_in_its_window(smollm2, tmp_path):
    """`unlearn eval`'s stage asks the pretrained model through ICUL's and the instruction's contexts (no rank
    starts), within its 8k window: nothing shortened, every score its own."""
    from unlearning.config import validate_config
    from unlearning.stages import evaluate

    raw = {"name": "smollm2-context", "seed": 0, "output_dir": str(tmp_path / "run"),
           "data": {"source": "synthetic", "forget_fraction": 0.25, "holdout_fraction": 0.25, "max_length": 64,
                    "synthetic": {"num_entities": 4, "facts_per_entity": 2, "num_utility": 0}},
           "model": {"base": str(smollm2), "target": str(smollm2), "oracle": str(smollm2)},
           "methods": [{"name": "icul", "n": 2}, {"name": "instruct"}],
           "eval": {"suite": "quick", "models": ["target", "unlearned"]}}
    evals = evaluate(validate_config(raw))
    assert list(evals) == ["target", "icul", "instruct"] and not (tmp_path / "run/unlearn").exists()
    for label in ("icul", "instruct"):
        encoding = evals[label].result["context"]["encoding"]
        assert all(e["max_length"] == 8192 and e["shortened"] == 0 for e in encoding.values())
        assert evals[label].metrics["forget_probability"] != evals["target"].metrics["forget_probability"]
