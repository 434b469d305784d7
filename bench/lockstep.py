"""Lockstep speed comparison for bench_unlearn.py: our engine, the Trainer baseline and a plain-PyTorch
floor in one process, taking turns step by step (the order rotating every step), so a slow spell of the
machine slows all alike. Run in its own process (it joins a 1-rank gloo group, as a launched rank does):

    python bench/lockstep.py JOB.json OUT.json

Ours is the rank's code: DeepSpeed engine, data streams (with the cached reference log-probs for
NPO), objective, and `run_loop` for one optimizer step at a time. The Trainer side is the body of
`Trainer`'s own inner loop for one step: `training_step` (the subclass's `compute_loss` and backward),
`_clip_grad_norm`, the optimizer and scheduler steps and `zero_grad`; its outer bookkeeping
(callbacks, logging checks) is left out, which can only favour it. The floor is the loop a user would write
by hand: the same micro-batches, one forward with every position's logits, the method's loss (NPO's
reference log-probs computed once beforehand, untimed, as ours caches them), backward, gradient clipping
and torch's fused AdamW; no framework, no packing, no answer-only logits.

Each side first takes one untimed step. The first step of a process pays for memory the process has
never touched (the optimizer states, the heap's first growth), and in one process whichever side went
first would pay it for both; the end-to-end runs of bench_unlearn.py, one process per side, time it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from trainer_baseline import build

from unlearning.config import validate_config
from unlearning.data.prepare import PreparedData
from unlearning.data.tokenize import collate
from unlearning.methods import METHODS
from unlearning.methods.logprobs import mean_token_nll, sequence_logprobs
from unlearning.train import engine as ds
from unlearning.train.job import _streams
from unlearning.train.launch import free_port
from unlearning.train.loop import run_loop
from unlearning.train.objective import UnlearningObjective, needs
from unlearning.train.sampler import Layout, micro_batches


def ours(job: dict[str, Any], scratch: Path) -> Any:
    """A closure running our next optimizer step; returns the real tokens it consumed."""
    cfg = validate_config(job["config"])
    ds.init_distributed()
    ds_config = ds.deepspeed_config(cfg.train, 1)
    model, _ = ds.load_for_training(job["target"], ds_config)
    model.config.use_cache = False
    engine = ds.initialize(model, ds_config, total_steps=job["steps"], warmup_ratio=cfg.train.warmup_ratio)
    prepared = PreparedData(Path(job["data"]), job["fingerprint"])
    tok = prepared.tokenizer()
    streams = _streams(cfg, engine, prepared.splits(), tok, needs(cfg.method), str(scratch / "ref.safetensors"),
                       resumed=False)
    objective = UnlearningObjective(cfg.method, pack=cfg.train.packing)
    batches = micro_batches(streams, Layout(cfg.train.batch_size, 1, 1), rank=0, seed=cfg.seed,
                            pad_id=tok.pad_token_id)
    done = 0

    def step() -> int:
        nonlocal done
        result = run_loop(engine, batches, objective, max_steps=done + 1, grad_accum=1, start_step=done,
                          show_progress=False)
        done += 1
        return result.tokens

    return step


def theirs(job: dict[str, Any], scratch: Path) -> Any:
    """A closure running the Trainer's next optimizer step; returns the real tokens it consumed."""
    trainer, tokens = build(job, scratch)
    trainer.create_optimizer_and_scheduler(num_training_steps=job["steps"])
    print(f"Trainer optimizer: {type(trainer.optimizer).__name__} {trainer.optimizer.defaults.get('fused')}",
          file=sys.stderr)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.zero_grad()
    batches = iter(trainer.get_train_dataloader())

    def step() -> int:
        nonlocal batches
        before = tokens["n"]
        try:
            inputs = next(batches)
        except StopIteration:  # the next epoch
            batches = iter(trainer.get_train_dataloader())
            inputs = next(batches)
        loss = trainer.training_step(model, inputs)
        bool(torch.isnan(loss) or torch.isinf(loss))  # the loop's NaN filter reads the loss every step
        trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return tokens["n"] - before

    return step


def floor(job: dict[str, Any], scratch: Path) -> Any:
    """A closure running the plain-PyTorch floor's next optimizer step; returns the real tokens it consumed."""
    from transformers import AutoModelForCausalLM

    prepared = PreparedData(Path(job["data"]), job["fingerprint"])
    splits, pad = prepared.splits(), prepared.tokenizer().pad_token_id
    forget, retain = list(splits["forget"]), list(splits["retain"])
    method = METHODS.get(job["method"])
    model = AutoModelForCausalLM.from_pretrained(job["target"], dtype=torch.float32)
    model.config.use_cache = False
    ref = None
    if method.meta.get("cached_ref"):
        with torch.no_grad():
            ref = torch.cat([sequence_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                                                     ).logits, b["labels"]).logp
                             for b in (collate([row], pad) for row in forget)])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []

    def step() -> int:
        nonlocal order
        if len(order) < job["batch_size"]:
            order = torch.randperm(len(forget), generator=gen).tolist()
        idx, order = order[:job["batch_size"]], order[job["batch_size"]:]
        f = collate([forget[i] for i in idx], pad)
        seq = sequence_logprobs(model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits,
                                f["labels"])
        loss = method.fn(seq if ref is None else seq.with_ref(ref[idx]))
        n = int(f["attention_mask"].sum())
        if job["alpha"] > 0:
            r = collate([retain[(i * 7) % len(retain)] for i in idx], pad)
            loss = loss + job["alpha"] * mean_token_nll(
                model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"])
            n += int(r["attention_mask"].sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return n

    return step


def main(job_path: Path, out_path: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    job = json.loads(job_path.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        sides = {"ours": ours(job, Path(scratch)), "trainer": theirs(job, Path(scratch)),
                 "floor": floor(job, Path(scratch))}
        for step in sides.values():
            step()  # untimed warm-up (see the module's docstring)
        seconds, tokens = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
        names = list(sides)
        for i in range(job["steps"] - 1):
            for name in names[i % 3:] + names[:i % 3]:
                start = time.perf_counter()
                tokens[name] += sides[name]()
                seconds[name] += time.perf_counter() - start
    out_path.write_text(json.dumps({name: {"tokens": tokens[name], "train_s": seconds[name],
                                           "tokens_per_s": tokens[name] / seconds[name]} for name in sides}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
