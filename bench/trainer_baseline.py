"""Baseline for bench_unlearn.py: the same unlearning steps through a `transformers.Trainer` subclass.

This is how research frameworks usually implement unlearning: a Trainer subclass whose `compute_loss`
runs the method, holding a second (reference) model in memory for NPO. The losses call the same
functions as our engine, so only the framework around them differs. Run in its own process:

    python bench/trainer_baseline.py JOB.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from unlearning.data.prepare import PreparedData
from unlearning.data.tokenize import collate
from unlearning.memory import peak_rss_mb, rss_mb
from unlearning.methods import METHODS
from unlearning.methods.logprobs import mean_token_nll, sequence_logprobs
from unlearning.train.engine import import_model_code


def build(job: dict[str, Any], out_dir: Path) -> tuple[Any, dict[str, int]]:
    """The baseline Trainer for a job, and its counter of the real tokens its batches hold so far."""
    prepared = PreparedData(Path(job["data"]), job["fingerprint"])
    splits, pad = prepared.splits(), prepared.tokenizer().pad_token_id
    forget, retain = list(splits["forget"]), list(splits["retain"])
    method, needs_ref = job["method"], bool(METHODS.get(job["method"]).meta.get("cached_ref"))
    model = AutoModelForCausalLM.from_pretrained(job["target"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(job["target"], dtype=torch.float32).eval() if needs_ref else None

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(forget)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"forget": forget[i], "retain": retain[(i * 7) % len(retain)]}

    class UnlearningTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            f = inputs["forget"]
            logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
            seq = sequence_logprobs(logits, f["labels"])
            if ref_model is not None:
                with torch.no_grad():
                    ref_logits = ref_model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
                seq = seq.with_ref(sequence_logprobs(ref_logits, f["labels"]).logp)
            loss = METHODS.get(method).fn(seq)
            if job["alpha"] > 0:
                r = inputs["retain"]
                r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
                loss = loss + job["alpha"] * mean_token_nll(r_logits, r["labels"])
            return loss

    tokens = {"n": 0}

    def counting_collator(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {k: collate([it[k] for it in items], pad) for k in ("forget", "retain")}
        tokens["n"] += int(batch["forget"]["attention_mask"].sum())
        tokens["n"] += int(batch["retain"]["attention_mask"].sum()) if job["alpha"] > 0 else 0
        return batch

    args = TrainingArguments(
        output_dir=str(out_dir / "trainer-out"), use_cpu=True, per_device_train_batch_size=job["batch_size"],
        max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_drop_last=True,
        seed=0)
    return UnlearningTrainer(model=model, args=args, train_dataset=Pairs(), data_collator=counting_collator), tokens


def main(job_path: Path, out_path: Path) -> None:
    job = json.loads(job_path.read_text())
    import_model_code(job["target"])  # as our ranks do, so both baselines hold the model's libraries
    rss_before_model = rss_mb()
    trainer, tokens = build(job, out_path.parent)

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            Clock.start = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            Clock.end = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    wall = Clock.end - Clock.start
    out_path.write_text(json.dumps({
        "tokens": tokens["n"], "train_s": wall, "tokens_per_s": tokens["n"] / wall,
        "peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": rss_before_model}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
