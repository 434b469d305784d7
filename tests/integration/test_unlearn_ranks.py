"""Unlearning on real DeepSpeed ranks (2 gloo ranks on CPU): every method under ZeRO-2 and ZeRO-3,
LoRA, stopping rules, and the invariances (ZeRO stage, rank count, micro-batch × accumulation, cached
reference log-probs). The jobs of each launch share one start of the ranks (tests.integration.unlearn_ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MEMORISE, pico_raw
from tests.integration.unlearn_ranks import launch_specs
from unlearning.config import validate_config
from unlearning.data.pairing import refusal_rows
from unlearning.evaluate.probes import answer_logprobs
from unlearning.models import build_models, load_causal_lm, method_auxiliary
from unlearning.stages import prepare
from unlearning.unlearn import job_spec, write_alternatives, write_constants

pytestmark = pytest.mark.distributed

METHODS = ["ga", "graddiff", "npo", "simnpo", "idkdpo", "wga", "satimp", "ceu", "undial", "rmu", "pdu", "altpo", "kga"]
# RMU on the 2-layer pico model: steer the last layer's output, train the MLPs only. PDU: its dual weight
# moves from the first step.
SECTIONS = {**{m: {"name": m} for m in METHODS},
            "rmu": {"name": "rmu", "layer": "model.layers.1", "trainable": [r"model\.layers\.[01]\.mlp\..*"]},
            "pdu": {"name": "pdu", "retain_loss_eps": 0.5, "dual_warmup_epochs": 0.0}}
# Every method whose maths differs in how it normalises (sequence, token, token subset, activation) or what it
# reads (cached reference, live reference, hidden states) is checked 1 rank against 2.
INVARIANT = ["graddiff", "npo", "wga", "ceu", "undial", "rmu", "pdu", "kga"]
TRAIN = {"lr": 1e-3, "max_steps": 4, "batch_size": 2, "warmup_ratio": 0.25}


class Jobs:
    """The pico target, its data, and the runs of every launch, by name."""

    def __init__(self, out: Path):
        self.out = out
        raw = pico_raw(out, model={"finetune": MEMORISE})
        cfg = validate_config(raw)
        self.target = str(build_models(cfg).target)
        self.prepared = prepare(cfg)
        # KGA's A_f and A_n, by the target's recipe (the build stage finds the target and oracle built).
        kga = validate_config(pico_raw(out, model={"finetune": MEMORISE}, method={"name": "kga"}))
        built = build_models(kga)
        self.auxiliary = {name: built.auxiliary[role] for name, role in method_auxiliary(kga.method).items()}
        self.runs: dict[str, Path] = {}
        self.bound = self.floor = 0.0

    def config(self, method: dict[str, Any], **train: Any):
        raw = pico_raw(self.out, model={"finetune": MEMORISE,
                                        "target": self.target}, method=method, train={**TRAIN, **train})
        return validate_config(raw)

    def launch(self, nproc: int, jobs: dict[str, Any]) -> None:
        specs = []
        for name, cfg in jobs.items():
            run_dir, spec = job_spec(cfg, self.target, self.prepared)
            if spec["alternatives"]:
                write_alternatives(cfg, self.target, self.prepared, Path(spec["alternatives"]))
            if spec["constants"]:
                write_constants(cfg, self.target, self.prepared, Path(spec["constants"]))
            self.runs[name] = run_dir
            specs.append(spec)
        launch_specs(specs, nproc, self.out / f"specs-{nproc}-{len(self.runs)}.json")

    def summary(self, name: str) -> dict[str, Any]:
        return json.loads((self.runs[name] / "run_summary.json").read_text())

    def losses(self, name: str) -> list[float]:
        return [h["loss"] for h in self.summary(name)["losses"]]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Jobs:
    jobs = Jobs(tmp_path_factory.mktemp("unlearn"))
    jobs.bound = -float(np.sum(_forget_logp(jobs, jobs.target))) / _forget_tokens(jobs) + 1.0
    jobs.floor = 0.5 * float(np.mean(_retain_probability(jobs, jobs.target)))
    for stage in (2, 3):
        runs = {f"{m}-z{stage}": jobs.config(SECTIONS[m], num_processes=2, zero_stage=stage) for m in METHODS}
        if stage == 2:
            runs["npo-z0"] = jobs.config({"name": "npo"}, num_processes=2, zero_stage=0)
            runs["npo-z1"] = jobs.config({"name": "npo"}, num_processes=2, zero_stage=1)
            runs["npo-bf16"] = jobs.config({"name": "npo"}, num_processes=2, bf16=True)
            runs["graddiff-accum"] = jobs.config({"name": "graddiff"}, num_processes=2, batch_size=1, grad_accum=2)
            runs["lora-kl"] = jobs.config({"name": "graddiff", "retain_loss": "kl"}, num_processes=2, lr=1e-2,
                                          gradient_checkpointing=True, lora={"enabled": True, "r": 4})
            runs["bound"] = jobs.config({"name": "ga"}, num_processes=2, lr=1e-2, max_steps=30,
                                        stop={"forget_loss_bound": jobs.bound})
            runs["floor"] = jobs.config({"name": "ga"}, num_processes=2, lr=1e-2, max_steps=30,
                                        stop={"utility_floor": jobs.floor, "utility_every": 1, "utility_sample": 8})
            runs["kga-stop"] = jobs.config({"name": "kga"}, num_processes=2, lr=1e-2, max_steps=30,
                                           stop={"forget_loss_fraction": 0.8})
            runs["holdout"] = jobs.config({"name": "npo"}, num_processes=2, lr=1e-2, max_steps=30, snapshot_every=2,
                                          stop={"holdout_match": "probability", "holdout_every": 1,
                                                "holdout_margin": 0.0, "holdout_sample": 6})
        else:
            runs["graddiff-kl-z3"] = jobs.config({"name": "graddiff", "retain_loss": "kl"}, num_processes=2,
                                                 zero_stage=3)
        jobs.launch(2, runs)
    one_rank = {f"{m}-1rank": jobs.config(SECTIONS[m], num_processes=1, batch_size=4) for m in INVARIANT}
    one_rank["npo-1rank-z0"] = jobs.config({"name": "npo"}, num_processes=1, batch_size=4, zero_stage=0)
    jobs.launch(1, one_rank)
    return jobs


def _forget_logp(jobs: Jobs, model_dir: str | Path) -> np.ndarray:
    model = load_causal_lm(model_dir)
    rows = list(jobs.prepared.splits()["forget"])
    return answer_logprobs(model, rows, pad_id=jobs.prepared.tokenizer().pad_token_id)[0]


def _forget_tokens(jobs: Jobs) -> int:
    rows = jobs.prepared.splits()["forget"]
    return sum(sum(1 for label in r["labels"][1:] if label != -100) for r in rows)


def _retain_probability(jobs: Jobs, model_dir: str | Path) -> np.ndarray:
    model = load_causal_lm(model_dir)
    rows = list(jobs.prepared.splits()["retain"])
    logp, n = answer_logprobs(model, rows, pad_id=jobs.prepared.tokenizer().pad_token_id)
    return np.exp(logp / n)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_forgets_and_saves_the_engine_weights(jobs, method, stage):
    name = f"{method}-z{stage}"
    summary = jobs.summary(name)
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["zero_stage"] == stage
    model_dir = jobs.runs[name] / "model"
    saved = load_causal_lm(model_dir).state_dict()
    engine = load_file(str(jobs.runs[name] / "engine_weights.safetensors"))
    target = load_causal_lm(jobs.target).state_dict()
    assert set(saved) == set(engine)
    for key, value in saved.items():  # the consolidated checkpoint is the engine's weights, exactly
        assert torch.equal(value, engine[key]), key
    assert any(not torch.equal(saved[k], target[k]) for k in saved)
    assert _forget_logp(jobs, model_dir).mean() < _forget_logp(jobs, jobs.target).mean()


@pytest.mark.parametrize("method", METHODS)
def test_zero2_and_zero3_take_the_same_steps(jobs, method):
    """Same data and weights; ZeRO-3 only partitions them, so the runs differ by the order of fp32 sums
    in the gradient reduction (observed: ≤ 1e-7 relative over 4 steps). AdamW's m/√v can amplify rounding
    on parameters whose gradient is near zero, hence a margin: 1e-5 relative (1e-6 absolute near 0)."""
    z2, z3 = jobs.losses(f"{method}-z2"), jobs.losses(f"{method}-z3")
    assert z2 == pytest.approx(z3, rel=1e-5, abs=1e-6)


def test_zero0_and_zero1_take_the_same_steps_and_bf16_trains(jobs):
    for stage in (0, 1):
        assert jobs.losses(f"npo-z{stage}") == pytest.approx(jobs.losses("npo-z2"), rel=1e-5, abs=1e-6)
    saved = load_causal_lm(jobs.runs["npo-z0"] / "model").state_dict()
    engine = load_file(str(jobs.runs["npo-z0"] / "engine_weights.safetensors"))
    assert all(torch.equal(v, engine[k]) for k, v in saved.items())
    bf16 = jobs.losses("npo-bf16")  # bf16 weights and activations: the same run to ~1e-2
    assert bf16 == pytest.approx(jobs.losses("npo-z2"), rel=2e-2)
    model_dir = jobs.runs["npo-bf16"] / "model"
    assert _forget_logp(jobs, model_dir).mean() < _forget_logp(jobs, jobs.target).mean()


@pytest.mark.parametrize("method", INVARIANT)
def test_one_rank_and_two_ranks_agree_at_the_same_effective_batch(jobs, method):
    """1 rank × 4 vs 2 ranks × 2: the same 4 items per step (rank-aware sampler) and token means taken over
    the global step (step normalisers), so only the order of fp32 sums differs. GradDiff's token-mean
    terms would differ by a few percent without the step normalisers. Tolerance as for the ZeRO stages."""
    one, two = jobs.losses(f"{method}-1rank"), jobs.losses(f"{method}-z2")
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
    if method == "npo":  # alone without ZeRO, the engine skips DeepSpeed's gradient all-reduce
        assert jobs.losses("npo-1rank-z0") == pytest.approx(two, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_rmu_trains_only_the_chosen_parameters(jobs, stage):
    """`trainable` selects the pico model's MLP weights: everything else keeps the target's values exactly."""
    saved = load_causal_lm(jobs.runs[f"rmu-z{stage}"] / "model").state_dict()
    target = load_causal_lm(jobs.target).state_dict()
    changed = {k for k in saved if not torch.equal(saved[k], target[k])}
    assert changed and all(".mlp." in k for k in changed)
    assert jobs.summary(f"rmu-z{stage}")["losses"][-1]["retain_loss"] >= 0


def test_pdu_raises_its_retain_weight_by_the_broken_constraint(jobs):
    """λ starts at alpha = 1 and moves by the rank-averaged retain loss minus ε = 0.5 after every step."""
    history = jobs.summary("pdu-z2")["losses"]
    weights = [h["retain_weight"] for h in history]
    assert weights[0] == 1.0
    for before, after, record in zip(weights, weights[1:], history, strict=False):
        assert after == pytest.approx(max(0.0, before + record["retain_loss"] - 0.5), rel=1e-6)


def test_micro_batch_times_accumulation_equivalence(jobs):
    """2 ranks × batch 1 × 2 accumulation steps = 2 ranks × batch 2: same items, same normalisers."""
    accum, plain = jobs.losses("graddiff-accum"), jobs.losses("graddiff-z2")
    assert accum == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_cached_reference_equals_a_live_reference_forward(jobs):
    """The cache was computed batched and sharded over 2 ranks; the live pass scores one example at a time."""
    summary = jobs.summary("idkdpo-z2")
    cache = load_file(summary["reference_cache"])
    tok, forget = jobs.prepared.tokenizer(), list(jobs.prepared.splits()["forget"])
    cfg = jobs.config({"name": "idkdpo"})
    idk = refusal_rows(tok, cfg.data.template, forget, seed=cfg.seed, max_length=cfg.data.max_length)
    model = load_causal_lm(jobs.target)
    for name, rows in (("forget", forget), ("idk", idk)):
        live = answer_logprobs(model, rows, pad_id=tok.pad_token_id, batch_size=1)[0]
        np.testing.assert_allclose(cache[name].numpy(), live, atol=1e-5)
    assert not np.allclose(cache["forget"].numpy(), cache["idk"].numpy())


def test_altpo_prefers_alternatives_the_target_wrote(jobs):
    """The pico target, asked each forget question and sampled, answers something other than the truth; the
    reference cache holds the alternatives' log-probs, and training raised them relative to the true answers."""
    summary = jobs.summary("altpo-z2")
    spec_path = next(p for p in (jobs.out / "alternatives").glob("*.json"))
    written = json.loads(spec_path.read_text())
    forget = list(jobs.prepared.splits()["forget"])
    assert len(written["alternatives"]) == len(forget) and sum(written["sources"].values()) == len(forget)
    assert written["sources"]["generated"] >= len(forget) // 2
    assert all(a["alternate"].strip() and a["alternate"] != a["answer"] for a in written["alternatives"])
    cache = load_file(summary["reference_cache"])
    assert set(cache) == {"forget", "alt"} and not np.allclose(cache["forget"].numpy(), cache["alt"].numpy())


def test_lora_with_gradient_checkpointing_and_kl_saves_adapter_and_merged_model(jobs):
    from peft import PeftModel

    run = jobs.runs["lora-kl"]
    summary = jobs.summary("lora-kl")
    assert summary["lora"] and (run / "adapter" / "adapter_config.json").is_file()
    merged = load_causal_lm(run / "model").state_dict()
    again = PeftModel.from_pretrained(load_causal_lm(jobs.target), str(run / "adapter")).merge_and_unload()
    target = load_causal_lm(jobs.target).state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], target[k])]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    for key, value in again.state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0)
    engine = load_file(str(run / "engine_weights.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for key, value in adapter.items():  # peft drops the adapter name ("default") in the saved file
        live = engine[key.replace(".lora_A.weight", ".lora_A.default.weight")
                      .replace(".lora_B.weight", ".lora_B.default.weight")]
        assert torch.equal(value, live), key
    assert summary["losses"][-1]["retain_loss"] >= 0  # KL is non-negative
    assert _forget_logp(jobs, run / "model").mean() < _forget_logp(jobs, jobs.target).mean()


def test_stopping_rules_end_gradient_ascent_early(jobs):
    """The bound is the target's forget NLL + 1 nat; the floor half its retain probability."""
    bound = jobs.summary("bound")
    nll = [h["forget_nll"] for h in bound["losses"]]
    assert bound["stopped_by"] == "forget_loss_bound" and bound["steps"] < 30
    assert nll[-1] >= jobs.bound > max(nll[:-1])  # it stopped at the first step past the bound
    floor = jobs.summary("floor")
    checks = [c["retain_probability"] for c in floor["utility_checks"]]
    assert floor["stopped_by"] == "utility_floor" and floor["steps"] < 30
    assert checks[-1] < jobs.floor <= min(checks[:-1])


def test_the_holdout_match_stops_when_the_forget_set_looks_unseen_and_snapshots_are_saved(jobs):
    """Stopped at the first check where the forget sample's mean probability fell to the holdout sample's
    (margin 0); every check before it had the forget set above. Every second step left a loadable HF snapshot,
    the last step's being the run's model/ itself."""
    summary = jobs.summary("holdout")
    checks = summary["holdout_checks"]
    assert summary["stopped_by"] == "holdout_match" and 1 < summary["steps"] < 30
    assert [c["step"] for c in checks] == list(range(summary["steps"] + 1))
    assert checks[-1]["probability"] <= checks[-1]["holdout_probability"]
    assert all(c["probability"] > c["holdout_probability"] for c in checks[:-1])
    steps = [int(k) for k in summary["snapshots"]]
    assert steps == list(range(2, summary["steps"], 2)) and steps
    snapshot = load_causal_lm(summary["snapshots"][str(steps[-1])]).state_dict()
    final = load_causal_lm(jobs.runs["holdout"] / "model").state_dict()
    target = load_causal_lm(jobs.target).state_dict()
    assert any(not torch.equal(snapshot[k], target[k]) for k in snapshot)
    assert any(not torch.equal(snapshot[k], final[k]) for k in snapshot)


def test_kga_constants_are_each_forget_items_paired_new_data_gap(jobs):
    """The constant of forget item i is KL(A_n ‖ A_D) averaged over the answer tokens of holdout item order[i],
    order a seeded permutation: recomputed here from the full logits of both models, one row at a time."""
    spec = job_spec(jobs.config({"name": "kga"}), jobs.target, jobs.prepared)[1]
    assert spec["aux"] == str(jobs.auxiliary["aux"])  # the model the build stage made
    constants = load_file(spec["constants"])["const"]
    splits = jobs.prepared.splits()
    holdout = list(splits["holdout"])
    assert len(constants) == len(splits["forget"])
    order = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(0))
    a_d, a_n = load_causal_lm(jobs.target), load_causal_lm(jobs.auxiliary["new"])
    for i in range(len(constants)):
        row = holdout[order[i % len(holdout)]]
        ids = torch.tensor([row["input_ids"]])
        scored = torch.tensor(row["labels"][1:]) != -100  # position t predicts token t + 1
        with torch.no_grad():
            p_n = torch.log_softmax(a_n(input_ids=ids).logits[0, :-1][scored], -1)
            p_d = torch.log_softmax(a_d(input_ids=ids).logits[0, :-1][scored], -1)
        expected = (p_n.exp() * (p_n - p_d)).sum(-1).mean()
        assert constants[i].item() == pytest.approx(expected.item(), rel=1e-4)
    assert constants.min() > 0


def test_kga_stops_once_its_alignment_loss_falls_to_the_fraction_of_its_start(jobs):
    """train.stop.forget_loss_fraction = 0.8: the run ends at the first step whose loss is at most 0.8 × step 1's,
    and only then (KGA's stop_portion)."""
    summary = jobs.summary("kga-stop")
    losses = [h["forget_loss"] for h in summary["losses"]]
    assert summary["stopped_by"] == "forget_loss_fraction" and summary["steps"] < 30
    assert losses[-1] <= 0.8 * losses[0] and all(x > 0.8 * losses[0] for x in losses[:-1])
