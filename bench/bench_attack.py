"""Attack-suite benchmark: the whole attack suite of one model against one plain evaluation of it, side by side.

On the config's first seed (the demo by default; its models built or reused through the stages), for one
evaluated model (`--label`, default the first unlearned method), alternating `--repeats` times:

- baseline: one plain evaluation of the model (`evaluate_checkpoint`: every split, every probe, the suite);
- ours: every attack point of the config for that model: the relearning fine-tunes (one start of the ranks,
  as the stage runs them; not cached: a fresh output directory each repeat) and the evaluation of each
  point, the oracle's results given (the oracle is attacked once per run for every model).

and, as the stage runs for a whole config (`--all`), every attacked label (the oracle included) at once, one start
of the ranks for all their relearning runs, against the plain evaluations of the same labels.

Prints both times and the ratio (target: ≤ 3×), and the per-point times of the fastest repeat.

    .venv/bin/python bench/bench_attack.py [--config configs/demo.yaml] [--label npo] [--repeats 2] [--all]
                                           [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--label", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="also the whole stage: every attacked label at once")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from unlearning import attack as stage
    from unlearning.config import load_config, seed_runs
    from unlearning.evaluate.runner import evaluate_checkpoint
    from unlearning.stages import evaluate, prepare

    cfg = next(iter(seed_runs(load_config(args.config, args.overrides)).values()))
    evals = evaluate(cfg)
    prepared = prepare(cfg)
    label = args.label or next(x for x in evals if x not in ("target", "oracle"))
    oracle = stage.attack(cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"models": []})}), evals,
                          prepared).results["oracle"]
    points = stage.attack_points(cfg)

    def one_model(fresh):
        relearned = stage._relearn(fresh, prepared, {label: evals[label].path})
        asked = stage.point_data(fresh, prepared, points)
        return stage._attack_model(fresh, prepared, evals[label], relearned.get(label, {}), oracle, asked)

    plain_s, attack_s, results = alternate(
        cfg, args.repeats, lambda: evaluate_checkpoint(evals[label].path, prepared, cfg, label=label,
                                                       oracle=evals["oracle"], is_oracle=False), one_model)
    print(f"model {label} ({cfg.name}, seed {cfg.seed}); {len(points)} attack points: {', '.join(points)}")
    report("plain evaluation", "attack suite", plain_s, attack_s)
    per_point = results[attack_s.index(min(attack_s))]["timing"]
    print("per point (s, evaluation only; relearning training is outside): "
          + ", ".join(f"{p} {t:.1f}" for p, t in per_point.items()))
    if args.all:
        whole_stage(cfg, evals, prepared, args.repeats)


def alternate(cfg, repeats: int, plain, attacked) -> tuple[list[float], list[float], list]:
    """`repeats` times: time `plain()`, then `attacked(cfg in a fresh output directory)` (nothing cached, removed
    after); both lists of seconds and the attacked results."""
    plain_s, attack_s, results = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        plain_s.append(time.perf_counter() - start)
        scratch = Path(tempfile.mkdtemp(prefix="bench-attack-"))
        try:
            start = time.perf_counter()
            results.append(attacked(cfg.model_copy(update={"output_dir": str(scratch)})))
            attack_s.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return plain_s, attack_s, results


def report(plain_name: str, attack_name: str, plain_s: list[float], attack_s: list[float]) -> None:
    """Both best times with every run, and their ratio against the issue's target."""
    for name, times in ((plain_name, plain_s), (attack_name, attack_s)):
        print(f"{name:<18}{min(times):8.1f} s   (runs: {', '.join(f'{t:.1f}' for t in times)})")
    print(f"{'ratio':<18}{min(attack_s) / min(plain_s):8.2f}x  (target: <= 3x)")


def whole_stage(cfg, evals, prepared, repeats: int) -> None:
    """The attack stage over every attacked label against a plain evaluation of each, alternating."""
    from unlearning import attack as stage
    from unlearning.evaluate.runner import evaluate_checkpoint

    labels = stage.attacked_labels(cfg, evals)

    def plain() -> None:
        for label in labels:
            alone = label == "oracle"
            evaluate_checkpoint(evals[label].path, prepared, cfg, label=label,
                                oracle=None if alone else evals["oracle"], is_oracle=alone)

    plain_s, attack_s, _ = alternate(cfg, repeats, plain, lambda fresh: stage.attack(fresh, evals, prepared))
    print(f"whole stage: {len(labels)} labels ({', '.join(labels)})")
    report("plain evaluations", "attack stage", plain_s, attack_s)


if __name__ == "__main__":
    main()
