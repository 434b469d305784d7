"""`unlearn` command line: parse, load the config, call one stage function, print its result."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearning.errors import UserError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # bitsandbytes warns at import that its optional fused CPU 4-bit kernel is missing; we bypass that kernel
    # anyway (`unlearning.models.load_causal_lm`), so the warning says nothing a user can act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _load(args: argparse.Namespace) -> Any:
    """The command's validated config (every problem reported before anything runs); libraries quietened."""
    from unlearning.config import load_config
    from unlearning.outputs import output_problems

    cfg = load_config(args.config, args.overrides)
    problems = output_problems(cfg.out)
    if args.command in ("run", "sweep", "sequence"):  # the commands that track to MLflow
        from unlearning.tracking import tracking_problems

        problems += tracking_problems(cfg.tracking.uri)
    if problems:
        raise UserError(problems)
    _quiet_libraries()
    return cfg


def _wide_console(min_width: int) -> Any:
    """A rich console at least `min_width` wide (wider than the terminal if need be): tables stay whole."""
    from rich.console import Console

    return Console(width=max(Console().width, min_width))


def _probability_table(probs: dict[str, dict[str, float]], title_suffix: str = "") -> Any:
    """A table of each model's (rows) mean answer probability on each split (columns)."""
    from rich.table import Table

    table = Table(title=f"Mean length-normalised answer probability{title_suffix}")
    splits = list(next(iter(probs.values())))
    table.add_column("model")
    for split in splits:
        table.add_column(split, justify="right")
    for label, p in probs.items():
        table.add_row(label, *(f"{p[k]:.3f}" for k in splits))
    return table


def cmd_validate(args: argparse.Namespace) -> None:
    from unlearning.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")


def cmd_prepare(args: argparse.Namespace) -> None:
    from unlearning.stages import prepare

    cfg = _load(args)
    prepared = prepare(cfg)
    info = prepared.info()
    print(f"prepared {prepared.path} (fingerprint {prepared.fingerprint})")
    for split, n in info["counts"].items():
        print(f"  {split:<10} {n:>6} items  {info['entities'].get(split, 0):>5} entities")


def _seeds(cfg: Any) -> list[tuple[str, Any]]:
    """(heading, config) per seed of `seeds` (no heading for a config without them)."""
    from unlearning.config import seed_runs

    runs = seed_runs(cfg)
    return [(f"seed {seed}" if cfg.seeds else "", run) for seed, run in runs.items()]


def cmd_build_models(args: argparse.Namespace) -> None:
    from rich.console import Console

    from unlearning.stages import build_models

    console = Console()
    for heading, cfg in _seeds(_load(args)):
        if heading:
            console.rule(heading)
        built = build_models(cfg)
        s = built.summary
        table = _probability_table({role: s["probability"][role] for role in ("target", "oracle")})
        for role, info in s["builds"].items():
            how = "cached" if info["cached"] else f"built in {info['wall_s']:.0f} s ({info['steps']} steps)"
            path = s[role] if role in ("target", "oracle") else s["auxiliary"][role]  # auxiliary: a method's (KGA)
            console.print(f"{role}: {path}  ({how}, final loss {info['final_loss']:.3f})", markup=False)
        console.print(table)


def cmd_unlearn(args: argparse.Namespace) -> None:
    from rich.console import Console

    from unlearning.config import in_context_labels, trained_runs
    from unlearning.stages import unlearn_many

    console = Console()
    seeds = _seeds(_load(args))
    context = in_context_labels(seeds[0][1])
    if context:
        console.print(f"{', '.join(context)}: in-context, nothing to train (`unlearn eval` evaluates it)", markup=False)
    runs = [(f"{heading}: {label}" if heading else label, done) for heading, cfg in seeds
            for label, done in unlearn_many(trained_runs(cfg)).items()]
    for label, done in runs:
        s = done.summary
        losses = s["losses"]
        how = "cached" if done.cached else f"{s['train_s']:.1f} s of training, {s['wall_s']:.0f} s in all"
        console.print(f"{label} ({s['method']['name']}): {s['steps']} steps on {s['world_size']} rank(s), "
                      f"ZeRO-{s['zero_stage']}{', LoRA' if s['lora'] else ''}, stopped by {s['stopped_by']} ({how})",
                      markup=False)
        if losses:
            console.print(f"loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}; forget NLL "
                          f"{losses[0]['forget_nll']:.3f} -> {losses[-1]['forget_nll']:.3f}; "
                          f"{s['tokens_per_s']:.0f} tokens/s; peak RSS {s['peak_rss_mb']:.0f} MB", markup=False)
        console.print(_probability_table(s["probability"]))
        console.print(f"model: {s['model']}" + (f"\nadapter: {s['adapter']}" if s.get("adapter") else ""),
                      markup=False)


def cmd_merge(args: argparse.Namespace) -> None:
    from rich.console import Console

    from unlearning.stages import merge

    console = Console()
    for heading, cfg in _seeds(_load(args)):
        if heading:
            console.rule(heading)
        s = merge(cfg).summary
        console.print(f"task vector: {s['task_vector']} (forget fine-tune run {s['finetune_run']})", markup=False)
        console.print(_probability_table(s["probability"], f", θ_target − λ·τ ({s['method']})"))
        for run in s["merged"]:
            how = "cached" if run["cached"] else f"merged in {run['merge_s']:.1f} s"
            console.print(f"λ={run['lambda']:g}: {run['model']} ({how})", markup=False)


HEADLINE = ("forget_quality", "model_utility", "forget_probability", "forget_rouge", "forget_truth_ratio",
            "forget_paraphrased_probability", "retain_probability", "retain_rouge", "forget_verbmem", "retain_verbmem",
            "forget_knowmem", "retain_knowmem", "forget_qa_knowmem", "retain_qa_knowmem", "mia_min_k_auc", "privleak",
            "forget_extraction_strength")


def cmd_eval(args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    from unlearning.config import seed_runs
    from unlearning.evaluate.report import format_spread, summarise
    from unlearning.stages import evaluate

    cfg = _load(args)
    results = {seed: evaluate(run) for seed, run in seed_runs(cfg).items()}
    summary = summarise({seed: {label: r.metrics for label, r in evals.items()} for seed, evals in results.items()})
    seeds = f", seeds {', '.join(map(str, results))}: median [min, max]" if len(results) > 1 else ""
    table = Table(title=escape(f"Evaluation, {cfg.eval.suite} suite{seeds} (n/a: unavailable, reason in eval.json)"))
    table.add_column("metric")
    for label in summary:
        table.add_column(label, justify="right")
    present = {k for m in summary.values() for k in m}
    choice = sorted(k for k in present if k.endswith(("_acc", "_acc_norm")))  # multiple choice, ours then lm-eval's
    for metric in [*(k for k in HEADLINE if k in present), *choice]:
        table.add_row(metric, *(format_spread(m.get(metric)) for m in summary.values()))
    console = _wide_console(34 + (12 if len(results) == 1 else 28) * len(summary))  # never cut a metric or model
    console.print(table)
    for seed, evals in results.items():
        for label, r in evals.items():
            where = f"{label} [seed={seed}]" if len(results) > 1 else label
            console.print(f"{where}: {r.eval_dir / 'eval.json'}{' (cached)' if r.cached else ''}", markup=False)


def cmd_attack(args: argparse.Namespace) -> None:
    from rich.markdown import Markdown

    from unlearning.config import seed_runs
    from unlearning.evaluate.report import summarise
    from unlearning.evaluate.robustness import robustness_markdown, summarise_attacks
    from unlearning.stages import attack, evaluate, prepare

    cfg = _load(args)
    if not cfg.attack.attacks:
        raise UserError("attack.attacks is empty; name the attacks to run, e.g. unlearn attack CONFIG "
                        "'attack.attacks=[relearn,quantize,choice,cloze,paraphrase,context,prefix]'")
    evals, attacked = {}, {}
    for seed, run in seed_runs(cfg).items():
        evals[seed] = evaluate(run)
        attacked[seed] = attack(run, evals[seed], prepare(run))
    plain = summarise({seed: {label: r.metrics for label, r in e.items()} for seed, e in evals.items()})
    summary, points, chance = summarise_attacks(attacked)
    console = _wide_console(40 + 22 * (len(points) + 1))
    console.print(Markdown(robustness_markdown(summary, plain, points, chance,
                                               ("target", "oracle", *cfg.eval.references))))
    for seed, a in attacked.items():
        for label, path in a.paths.items():
            console.print(f"{label}{f' [seed={seed}]' if len(attacked) > 1 else ''}: {path}", markup=False)


def _print_report(report: dict[str, Any], uri: str) -> None:
    """The end of `unlearn run` and `unlearn sweep`: the results table, the plot, how to browse the runs."""
    from rich.markup import escape
    from rich.table import Table

    from unlearning.evaluate.report import Spread, format_spread, summarise, table_columns
    from unlearning.tracking import ui_command, ui_url

    summary = summarise({int(seed): models for seed, models in report["per_seed"].items()})
    several = len(report["seeds"]) > 1
    table = Table(title=escape(report["title"] + (f", seeds {', '.join(map(str, report['seeds']))}: median "
                                                  "[min, max]" if several else "")))
    table.add_column("model")
    columns = table_columns(summary)
    for column in columns:
        table.add_column(column, justify="right")
    for label, m in summary.items():
        table.add_row(label, *(format_spread(m.get(c)) for c in columns))
    console = _wide_console(40 + (16 if not several else 30) * len(columns))
    console.print(table)
    cached = sum(state == "Cached" for state in report["stages"].values())
    console.print(f"best: {report['best']} ({report['why']}{', on medians' if several else ''})", markup=False)
    if report.get("noise_floor"):
        floor = format_spread(Spread.of(list(report["noise_floor"].values())))
        console.print(f"noise floor: oracle vs oracle (other seed) forget quality {floor}", markup=False)
    robust = report.get("robustness")
    if robust:
        from rich.markdown import Markdown

        _wide_console(40 + 22 * (len(robust["points"]) + 1)).print(Markdown(robust["markdown"]))
    console.print(f"stages: {len(report['stages'])} ran, {cached} of them from the cache", markup=False)
    console.print(f"plot: {report['plot']}", markup=False)
    if robust:
        console.print(f"robustness plot: {robust['plot']}", markup=False)
    console.print(f"report: {Path(report['plot']).with_name('report.md')}", markup=False)
    command = ui_command(uri)
    if report.get("mlflow_run"):
        browse = f"{command}   then open {report['mlflow_run']}" if command else f"open {report['mlflow_run']}"
        console.print(f"MLflow: {browse}", markup=False, soft_wrap=True)
        if report.get("mlflow_compare"):
            console.print(f"MLflow, every run of this experiment side by side: {report['mlflow_compare']}",
                          markup=False, soft_wrap=True)
    elif uri:
        console.print(f"MLflow: {ui_url(uri)}", markup=False)


def cmd_run(args: argparse.Namespace) -> None:
    cfg = _load(args)  # every config, output and tracking problem before Prefect is even imported
    ready = _prefect()
    from flows.pipeline import pipeline

    ready()
    _print_report(pipeline(cfg.to_dict()), cfg.tracking.uri)


def cmd_sweep(args: argparse.Namespace) -> None:
    cfg = _load(args)
    ready = _prefect()
    from flows.sweep import grid_points, parse_grid, sweep

    grid = parse_grid([item for group in args.grid or [] for item in group])
    if not grid:
        raise UserError("unlearn sweep needs --grid KEY=V1,V2 ... (e.g. --grid train.lr=1e-4,5e-4 seed=0,1)")
    grid_points(cfg.to_dict(), grid)  # every point validated before the flow starts
    ready()
    _print_report(sweep(cfg.to_dict(), grid), cfg.tracking.uri)


def cmd_sequence(args: argparse.Namespace) -> None:
    cfg = _load(args)
    ready = _prefect()
    from rich.markdown import Markdown

    from flows.sequence import sequence_flow
    from unlearning.tracking import ui_command

    ready()
    result = sequence_flow(cfg.to_dict())
    console = _wide_console(150)  # one column per request: never cut a number
    console.print(Markdown(result["table"]))
    console.print(f"ledger: {result['path']}\nplot: {result['plot']}", markup=False)
    if result["mlflow_run"]:
        command = ui_command(cfg.tracking.uri)
        browse = f"{command}   then open " if command else "open "
        console.print(f"MLflow: {browse}{result['mlflow_run']}", markup=False, soft_wrap=True)


def _prefect() -> Callable[[], None]:
    """Prefect for a flow command, before it is imported (it reads its settings then): this process's own
    temporary API server started (`flows.server`: it dies with `unlearn`, even by SIGKILL) and Prefect
    quietened. Returns `ready`, to call after the slow imports, before the flow: the server starts meanwhile."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.server import own_server

    server = own_server()
    _quiet_prefect()
    return server.wait if server else lambda: None


def _quiet_prefect() -> None:
    """Prefect's own INFO lines per task run drown the stage output; warnings and errors still show, except the
    task and flow failures that are our `UserError`s: `main` prints those once as `error:` lines, and Prefect's
    copy of each (an ERROR line and a traceback per task, flow and engine) would bury them."""
    import prefect.main  # noqa: F401 (importing Prefect's entry module sets up its logging handlers)

    # Prefect's console handler sits on the root logger: its task and flow loggers propagate there.
    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs", "prefect.engine"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_not_a_user_error)


def _not_a_user_error(record: Any) -> bool:
    """A logging filter: False for Prefect's records of a failure caused by a `UserError`."""
    exc = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    return not isinstance(exc, UserError) and "UserError" not in message and "TrainingFailed" not in message


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "validate": (cmd_validate, "check a config and print it resolved (every error at once)"),
    "prepare": (cmd_prepare, "build the forget/retain/holdout/eval splits and the tokenizer"),
    "build-models": (cmd_build_models, "build (or reuse) the target model and the retain oracle"),
    "unlearn": (cmd_unlearn, "unlearn the forget set from the target with each method (DeepSpeed ranks)"),
    "merge": (cmd_merge, "task-vector negation θ_target − λ·τ over merge.lambdas (τ: a forget fine-tune)"),
    "eval": (cmd_eval, "evaluate eval.models (target, oracle, unlearned, LABEL=PATH) with eval.suite"),
    "attack": (cmd_attack, "attack every evaluated model and the oracle alike (attack.attacks: relearning, "
                           "quantization, other question formats, context): does the forgetting survive?"),
    "run": (cmd_run, "the whole pipeline as a Prefect flow tracked in MLflow: data to a report comparing methods"),
    "sweep": (cmd_sweep, "the pipeline over a grid of config values (--grid KEY=V1,V2), one combined report"),
    "sequence": (cmd_sequence, "forget requests one after another (sequence.requests), with a ledger and a plot"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Make a language model forget, and prove it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-5 method.name=npo")
        if name == "sweep":
            p.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2",
                           help="values to sweep, e.g. --grid train.lr=1e-4,5e-4 'methods=[{name: ga}],[{name: npo}]'")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages and complete checkpoints are kept; rerun the same command to go on",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
