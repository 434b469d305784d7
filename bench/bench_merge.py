"""Merge benchmark: streamed task arithmetic vs loading every model fully, side by side on the same files.

Two random Llama-architecture checkpoints of the same shape (default ~1.3 GB each in float32, saved in
500 MB shards) stand for the target and its forget fine-tune. Each side computes the negation
θ_target − λ·(θ_ft − θ_target) into a sharded checkpoint, in its own process:

- streamed: `unlearning.merge.streaming.merge_checkpoints` (row chunks of `--chunk-mb`),
- full load: every tensor of both models loaded (safetensors `load_file`), the same float32 arithmetic
  in memory, saved with huggingface_hub's sharded `save_torch_state_dict`.

Reported per side: wall time, peak RSS, and peak RSS minus the RSS before the merge began (the
interpreter and libraries), each against one model's size (target: streamed peak ≤ 0.25× and no slower
than the full load). The two outputs are compared tensor by tensor.

    .venv/bin/python bench/bench_merge.py [--layers 4] [--hidden 2048] [--chunk-mb 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "runs" / "bench-merge"


def make_models(args: argparse.Namespace) -> tuple[Path, Path, int]:
    """Two random checkpoints (reused while their shape is unchanged); returns their paths and byte size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
    paths = []
    for i, name in enumerate(("target", "finetuned")):
        path = WORK / f"{name}-{args.hidden}x{args.layers}"
        if not (path / "config.json").is_file():
            torch.manual_seed(i)
            with torch.no_grad():
                model = LlamaForCausalLM(cfg)
                model.save_pretrained(str(path), safe_serialization=True, max_shard_size="500MB")
                del model
        paths.append(path)
    from unlearning.merge.safetensors_io import checkpoint_tensors

    size = sum(t.nbytes for t in checkpoint_tensors(paths[0]).values())
    return paths[0], paths[1], size


def side(kind: str, base: Path, task: Path, out: Path, lam: float, chunk_mb: int) -> dict[str, Any]:
    """One merge in this process (called in a child); prints a JSON line with its timings and memory."""
    import shutil

    from unlearning.memory import peak_rss_mb, rss_mb

    shutil.rmtree(out, ignore_errors=True)
    if kind == "streamed":
        from unlearning.merge.streaming import merge_checkpoints

        before = rss_mb()
        start = time.perf_counter()
        merge_checkpoints(base, [(task, -lam)], out, chunk_bytes=chunk_mb << 20, max_shard_bytes=500 << 20)
    else:
        from huggingface_hub import save_torch_state_dict
        from safetensors.torch import load_file

        from unlearning.merge.safetensors_io import INDEX

        def load(path: Path) -> dict[str, Any]:
            files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
            state: dict[str, Any] = {}
            for f in files:
                state.update(load_file(str(path / f)))
            return state

        before = rss_mb()
        start = time.perf_counter()
        b, t = load(base), load(task)
        merged = {}
        for k in list(b):
            acc = b[k].float().clone()
            acc.add_(t.pop(k).float() - b[k].float(), alpha=-lam)
            merged[k] = acc.to(b[k].dtype)
        out.mkdir(parents=True)
        save_torch_state_dict(merged, str(out), max_shard_size="500MB")
        shutil.copy2(base / "config.json", out / "config.json")
    return {"wall_s": time.perf_counter() - start, "peak_mb": peak_rss_mb(), "before_mb": before}


def run_side(kind: str, base: Path, task: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = WORK / f"out-{kind}"
    res = subprocess.run([sys.executable, __file__, "--side", kind, str(base), str(task), str(out),
                          str(args.lam), str(args.chunk_mb)], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_outputs() -> tuple[int, int]:
    """(tensors compared, tensors differing) between the two sides' outputs, read tensor by tensor."""
    import torch

    from unlearning.merge.safetensors_io import checkpoint_tensors, read_rows

    a, b = checkpoint_tensors(WORK / "out-streamed"), checkpoint_tensors(WORK / "out-full")
    differ = sum(not torch.equal(read_rows(a[k], 0, a[k].rows), read_rows(b[k], 0, b[k].rows)) for k in a)
    return len(a), differ + len(set(a) ^ set(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-mb", type=int, default=16)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the fastest counts")
    parser.add_argument("--side", nargs=6, help=argparse.SUPPRESS)  # KIND BASE TASK OUT LAM CHUNK_MB (a child)
    args = parser.parse_args()
    if args.side:
        kind, base, task, out, lam, chunk = args.side
        print(json.dumps(side(kind, Path(base), Path(task), Path(out), float(lam), int(chunk))))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    base, task, size = make_models(args)
    runs: dict[str, list[dict[str, Any]]] = {"streamed": [], "full": []}
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both sides
        for kind in runs:
            runs[kind].append(run_side(kind, base, task, args))
    best = {k: min(r, key=lambda x: x["wall_s"]) for k, r in runs.items()}
    compared, differing = same_outputs()
    mb = size / 2**20
    print(f"\nmodels: 2 × {mb:.0f} MB ({args.hidden}x{args.layers} Llama, float32, 500 MB shards); "
          f"θ − {args.lam:g}·τ; chunk {args.chunk_mb} MB; best of {args.repeats} alternating runs")
    print(f"{'side':<10}{'wall s':>9}{'peak RSS MB':>13}{'× model':>9}{'added MB':>10}{'× model':>9}")
    for kind, r in best.items():
        added = r["peak_mb"] - r["before_mb"]
        print(f"{kind:<10}{r['wall_s']:>9.1f}{r['peak_mb']:>13.0f}{r['peak_mb'] / mb:>9.3f}{added:>10.0f}"
              f"{added / mb:>9.3f}")
    print(f"streamed / full: time {best['streamed']['wall_s'] / best['full']['wall_s']:.2f}×, peak RSS "
          f"{best['streamed']['peak_mb'] / best['full']['peak_mb']:.3f}×; outputs: {compared} tensors, "
          f"{differing} differ")
    (WORK / "bench.json").write_text(json.dumps({"args": vars(args), "model_mb": mb, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
