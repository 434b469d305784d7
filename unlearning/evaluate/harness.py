"""lm-evaluation-harness as an optional evaluator of our checkpoints (`eval.lm_eval`).

WMDP's and MMLU's published numbers come from lm-evaluation-harness, so a model unlearned here can be scored by
it as well: the loaded model and its tokenizer are handed to the harness's `HFLM` (no second load), and the
harness runs the named tasks. `split:<name>` names a prepared multiple-choice split: a local task file is written
for it (a JSON Lines copy of the split, the question through `data.template.prompt`, the options after the
template's answer prefix), so the embedded benchmark runs offline and the harness's accuracy can be checked
against our own `multiple_choice` metric on the same items. Any other name is one of the harness's tasks
(`wmdp_bio`, `mmlu`, ...: they download their data, so they need the hub) or one under `eval.lm_eval.include_path`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from unlearning.errors import UserError
from unlearning.schema import ExperimentConfig, Template

SPLIT_PREFIX = "split:"


def task_name(task: str) -> str:
    """The harness's name of a task: a prepared split's `unlearning_<split>`, else the name as given."""
    return f"unlearning_{task.removeprefix(SPLIT_PREFIX)}" if task.startswith(SPLIT_PREFIX) else task


def metric_prefix(task: str) -> str:
    """How a task's results are named in eval.json: `lm_eval_<task>_acc`, `..._acc_norm`."""
    return "lm_eval_" + task.removeprefix(SPLIT_PREFIX).replace("/", "_")


def _jinja_prompt(template: Template) -> tuple[str, str]:
    """The template as the harness's doc_to_text (Jinja) and target_delimiter: the prompt with {{question}}, and
    the text before {answer} in the answer format."""
    answer = template.answer or " {answer}"
    if not answer.endswith("{answer}") or template.response_prefix:
        raise UserError("eval.lm_eval: a prepared split's task renders the options right after the template's "
                        f"answer prefix; data.template.answer {answer!r} (or a response_prefix) puts text after or "
                        "around the answer, which the harness's multiple-choice format cannot express")
    def literal(text: str) -> str:  # Jinja would read braces, % and # in the template's own words
        return f"{{% raw %}}{text}{{% endraw %}}" if any(c in text for c in "{}%#") else text

    parts = template.prompt.format(question="\x00").split("\x00")
    return "{{question}}".join(literal(p) for p in parts), answer.removesuffix("{answer}")


def write_split_task(rows: list[dict[str, Any]], split: str, template: Template, out: Path) -> None:
    """A local task for one prepared multiple-choice split, in `out`: `<split>.jsonl` and `<split>.yaml`."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{split}.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "choices": list(r["choices"]),
                                        "answer_index": int(r["answer_index"])}) + "\n" for r in rows))
    prompt, delimiter = _jinja_prompt(template)
    task = {"task": task_name(SPLIT_PREFIX + split), "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": prompt, "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer_index}}", "target_delimiter": delimiter,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}
    (out / f"{split}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def run_harness(model: Any, tokenizer: Any, cfg: ExperimentConfig, splits: dict[str, list[dict[str, Any]]],
                work: Path) -> dict[str, Any]:
    """Run `eval.lm_eval.tasks` on a loaded model: per task its acc and acc_norm (where the task reports them),
    and per prepared split's task the log-likelihood of every option (`loglikelihoods`, doc order)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    settings = cfg.eval.lm_eval
    for task in settings.tasks:
        if task.startswith(SPLIT_PREFIX):
            split = task.removeprefix(SPLIT_PREFIX)
            write_split_task(splits[split], split, cfg.data.template, work / "tasks")
    include = [str(work / "tasks")] if (work / "tasks").is_dir() else []
    if settings.include_path:
        include.append(settings.include_path)
    manager = TaskManager(include_path=include or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [task_name(t) for t in settings.tasks]
    out = simple_evaluate(model=lm, tasks=names, num_fewshot=settings.num_fewshot, limit=settings.limit,
                          task_manager=manager, log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                          torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    results: dict[str, Any] = {"metrics": {}, "loglikelihoods": {}}
    for task, name in zip(settings.tasks, names, strict=True):
        for metric in ("acc", "acc_norm"):
            value = out["results"].get(name, {}).get(f"{metric},none")
            if value is not None:
                results["metrics"][f"{metric_prefix(task)}_{metric}"] = float(value)
        samples = sorted(out.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
        if task.startswith(SPLIT_PREFIX) and samples:
            results["loglikelihoods"][task] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return results


def harness_problems(cfg: ExperimentConfig, counts: dict[str, int], choice_splits: set[str]) -> list[str]:
    """Problems with eval.lm_eval found before any model is loaded: the harness installed, each prepared split a
    multiple-choice split, each other task known to the harness and, offline, not one that downloads its data."""
    settings = cfg.eval.lm_eval
    if not settings.tasks:
        return []
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return ["eval.lm_eval.tasks needs lm-evaluation-harness: pip install lm-eval (the lock installs it)"]
    problems = []
    named = [t for t in settings.tasks if not t.startswith(SPLIT_PREFIX)]
    for task in settings.tasks:
        split = task.removeprefix(SPLIT_PREFIX)
        if task.startswith(SPLIT_PREFIX) and split not in choice_splits:
            problems.append(f"eval.lm_eval.tasks: {task!r}: {split!r} is not a prepared multiple-choice split; "
                            f"those are: {', '.join(sorted(choice_splits)) or 'none'}")
    if named:
        known = set(TaskManager(include_path=settings.include_path).all_tasks)
        unknown = [t for t in named if t not in known]
        if unknown:
            problems.append(f"eval.lm_eval.tasks: {unknown} are not lm-evaluation-harness tasks (nor under "
                            "eval.lm_eval.include_path); prefix a prepared multiple-choice split with 'split:'")
        elif os.environ.get("HF_DATASETS_OFFLINE") == "1" and not settings.include_path:
            problems.append(f"eval.lm_eval.tasks: {named} download their data from the hub, and HF_DATASETS_OFFLINE=1 "
                            "(the Makefile's default); unset it (and HF_HUB_OFFLINE) on a machine that reaches the "
                            "hub, or evaluate a prepared split (split:<name>)")
    return problems
