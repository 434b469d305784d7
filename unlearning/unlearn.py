"""The unlearn stage: launch the DeepSpeed job that unlearns the forget set from the target model.

`unlearn(cfg, prepared=, built=)` takes the prepared data and the built target (or makes them), checks the run
against the data before anything starts, writes a job spec and launches `python -m unlearning.train` on
`train.num_processes` ranks per node through torchrun or the deepspeed launcher (an argv list). The run
directory `<output_dir>/unlearn/<method>-<hash of every input>/` holds `model/` (a consolidated HF
checkpoint), `adapter/` (LoRA), `checkpoints/` (DeepSpeed), `train.log` and `run_summary.json`, written last
by rank 0. A finished run is reused; an unfinished one resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.checkpoints import checkpoint_dir
from unlearning.config import dump_yaml
from unlearning.data.prepare import PreparedData, prepare
from unlearning.errors import raise_if
from unlearning.hashing import content_hash
from unlearning.methods import METHODS, in_context
from unlearning.models import (
    BuiltModels,
    build_models,
    built_model,
    method_auxiliary,
    model_dir,
    model_identity,
    probabilities,
    role_key,
    tiny_llama,
)
from unlearning.outputs import write_atomic
from unlearning.schema import ExperimentConfig, MethodConfig, StopConfig
from unlearning.train.launch import read_hostfile
from unlearning.train.objective import needs
from unlearning.train.supervise import TrainingFailed as TrainingFailed  # re-exported: what unlearn() raises
from unlearning.train.supervise import launch, launch_group, world_size

UNLEARN_VERSION = 1


@dataclass(frozen=True)
class Unlearned:
    model: Path
    run_dir: Path
    summary: dict[str, Any]
    cached: bool


def launch_problems(cfg: ExperimentConfig) -> list[str]:
    """Problems with how the job would start, found from the config alone."""
    if in_context(cfg.method):
        return [f"method {cfg.method.name!r} is an in-context method: it trains nothing, so there is no job to "
                "launch; `unlearn eval` and `unlearn run` evaluate it on the target (eval.models: unlearned)"]
    train, problems = cfg.train, []
    if train.hostfile and not Path(train.hostfile).is_file():
        problems.append(f"train.hostfile: {train.hostfile!r} does not exist; write one 'HOST slots=N' line per node")
    if train.num_nodes > 1 and train.launcher == "deepspeed" and not train.hostfile:
        problems.append("train.num_nodes > 1 with the deepspeed launcher needs train.hostfile listing the nodes")
    if train.hostfile and Path(train.hostfile).is_file() and len(read_hostfile(train.hostfile)) < train.num_nodes:
        problems.append(f"train.hostfile {train.hostfile} lists {len(read_hostfile(train.hostfile))} node(s), fewer "
                        f"than train.num_nodes={train.num_nodes}; add one 'HOST slots=N' line per node")
    node_rank = os.environ.get("NODE_RANK", "0")
    if not node_rank.isdigit() or int(node_rank) >= train.num_nodes:
        problems.append(f"NODE_RANK={node_rank} is not a node of this job (0 to {train.num_nodes - 1}); set it to this "
                        "node's line in the hostfile, counting from 0")
    return problems


def data_problems(cfg: ExperimentConfig, prepared: PreparedData) -> list[str]:
    """Problems with running this method on this data and model, found before any model is built."""
    counts = prepared.info()["counts"]
    need, world, problems = needs(cfg.method), world_size(cfg), []
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world
    fix = "lower train.batch_size, train.grad_accum or the number of ranks, or forget more"
    if counts.get("forget", 0) < global_batch:
        problems.append(f"the forget set has {counts.get('forget', 0)} examples, fewer than one global batch "
                        f"({cfg.train.batch_size} × {cfg.train.grad_accum} accumulation × {world} ranks = "
                        f"{global_batch}); {fix}")
    if (need["retain"] or cfg.train.stop.utility_floor is not None) and counts.get("retain", 0) < global_batch:
        problems.append(f"the retain set has {counts.get('retain', 0)} examples, fewer than one global batch "
                        f"({global_batch}); lower the batch or set method.alpha=0")
    if cfg.train.stop.holdout_match == "truth_ratio" and not all(prepared.splits()[s][0].get("perturbed_answer")
                                                                 for s in ("forget", "holdout") if counts.get(s)):
        problems.append("train.stop.holdout_match=truth_ratio needs perturbed answers in the forget and holdout "
                        "splits; map data.columns.perturbed_answer, or use auc or probability")
    if cfg.train.stop.holdout_match is not None and counts.get("holdout", 0) < 2:
        problems.append(f"train.stop.holdout_match compares the forget set with the holdout set, and the data has "
                        f"{counts.get('holdout', 0)} holdout examples; add a holdout split (data.splits.holdout, or "
                        "data.holdout_fraction for the synthetic source) or unset the rule")
    problems += auxiliary_problems(cfg, counts)
    if "forget" in prepared.info().get("documents", {}) and (need["idk"] or need["alt"]):
        problems.append(f"method {cfg.method.name!r} pairs each forget question with another answer (a refusal or an "
                        "alternative), and the forget split is text, which has no questions; use a method that reads "
                        "the forget tokens alone (ga, graddiff, npo, simnpo, rmu, ...)")
    if cfg.train.lora.enabled or "layer" in cfg.method.params or METHODS.get(cfg.method.name).meta.get("trains"):
        model, source = _empty_model(cfg, prepared.tokenizer())
        problems += _lora_problems(cfg, model, source) + _method_problems(cfg, model, source)
    return problems


def auxiliary_problems(cfg: ExperimentConfig, counts: dict[str, int]) -> list[str]:
    """A method's auxiliary models are fine-tuned from model.base on splits of the data, which must be there."""
    spec = METHODS.get(cfg.method.name).meta.get("auxiliary")
    if spec is None:
        return []
    problems = []
    if cfg.model.target and cfg.model.base == "tiny":
        problems.append(f"method {cfg.method.name!r} fine-tunes auxiliary models from model.base by the target's "
                        "recipe, and model.target is given with no base: set model.base to the target's base model")
    for name, splits in spec(cfg.method.params).items():
        for split in splits:
            if split in ("retain", "world_facts") or (name == "new" and split == "forget"):
                problems.append(f"method.new_data={split!r}: the new data must be disjoint from what the target was "
                                "trained on; name a held-out split (holdout, or one of data.splits)")
            elif not counts.get(split):
                problems.append(f"method {cfg.method.name!r} fine-tunes a model on the {split!r} split, which the "
                                f"prepared data {'has no rows of' if split in counts else 'does not have'}; splits: "
                                f"{', '.join(s for s, n in counts.items() if n)}")
    return problems


def _empty_model(cfg: ExperimentConfig, tokenizer: Any) -> tuple[Any, str]:
    """An empty (meta-device) model of the architecture that will be unlearned, and where it comes from:
    module and parameter names are checked on it before the target is even built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = cfg.model.target or (None if cfg.model.base == "tiny" else cfg.model.base)
    with torch.device("meta"):
        if source is None:
            return tiny_llama(cfg, tokenizer), "the tiny model"
        config = AutoConfig.from_pretrained(checkpoint_dir(source), trust_remote_code=cfg.model.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code), source


def _lora_problems(cfg: ExperimentConfig, model: Any, source: str) -> list[str]:
    """Every LoRA target module name must match linear layers of the model."""
    import torch

    if not cfg.train.lora.enabled:
        return []
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in cfg.train.lora.target_modules if m not in leaves]
    if unknown:
        return [f"train.lora.target_modules: {unknown} are not linear layers of {source}; "
                f"valid names: {', '.join(sorted(leaves))}"]
    return []


def _method_problems(cfg: ExperimentConfig, model: Any, source: str) -> list[str]:
    """A method's `layer` must name one module of the model, and its `trains` regexes some parameters."""
    method, problems = cfg.method, []
    layer = method.params.get("layer")
    if layer is not None and layer not in dict(model.named_modules()):
        blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?layers\.\d+", n)]
        where = f"; its decoder layers are {blocks[0]} to {blocks[-1]}" if blocks else ""
        problems.append(f"method.layer: {layer!r} is not a module of {source}{where}")
    key = METHODS.get(method.name).meta.get("trains")
    if key is None:
        return problems
    patterns = method.params[key]
    try:
        compiled = [re.compile(x) for x in patterns]
    except re.error as e:
        return [*problems, f"method.{key}: {e.pattern!r} is not a regular expression ({e})"]
    if cfg.train.lora.enabled and patterns != METHODS.get(method.name).defaults()[key]:
        problems.append(f"method.{key} chooses the parameters that train, and train.lora.enabled trains the LoRA "
                        f"adapters instead; use one of the two")
    elif not any(p.fullmatch(n) for p in compiled for n, _ in model.named_parameters()):
        problems.append(f"method.{key}: {patterns} match no parameter of {source} (full match, e.g. "
                        "'model\\.layers\\.(2|3)\\.mlp\\..*')")
    return problems


# Settings that change how a run goes, not its weights (packing: the same losses up to float rounding).
RUN_SETTINGS = {"checkpoint_every", "keep_checkpoints", "hostfile", "timeout_s", "packing"}


def forget_finetune(cfg: ExperimentConfig, *, lr: float, max_steps: int, lora: bool, **train: Any
                    ) -> ExperimentConfig:
    """`cfg` as a fine-tune on its forget set: method `finetune` (descent on the forget NLL, no retain term),
    `lr`, `max_steps`, no stop rules (not even `collapse`: an attack may wreck the model), LoRA on or off
    (train.lora's r/alpha/modules), any further `train` settings; the launch (ranks, ZeRO, batch) as the
    config's. The merge's task vector and the attack stage's relearning are both this run."""
    method = MethodConfig(name="finetune", gamma=1.0, alpha=0.0, retain_loss="none")
    settings = cfg.train.model_copy(update={"lr": lr, "max_steps": max_steps, "stop": StopConfig(collapse=None),
                                            "lora": cfg.train.lora.model_copy(update={"enabled": lora}), **train})
    return cfg.model_copy(update={"method": method, "train": settings})


def run_key(cfg: ExperimentConfig, target: str, prepared: PreparedData) -> str:
    """Everything the unlearned weights depend on (the auxiliary models by their build keys)."""
    aux = {name: role_key(cfg, prepared, role) for name, role in method_auxiliary(cfg.method).items()}
    return content_hash(UNLEARN_VERSION, model_identity(target), prepared.fingerprint, cfg.method.model_dump(),
                        cfg.train.model_dump(exclude=RUN_SETTINGS),
                        world_size(cfg), cfg.seed, cfg.model.dtype, cfg.data.template.model_dump(),
                        *([aux] if aux else []))


def job_spec(cfg: ExperimentConfig, target: str, prepared: PreparedData) -> tuple[Path, dict[str, Any]]:
    """The run directory of this unlearning run and the spec its ranks read (with the method's live auxiliary
    model, where it has one: built by `build_models`, or before the launch by `unlearn_many`)."""
    run_dir = cfg.out / "unlearn" / f"{cfg.method.name}-{run_key(cfg, target, prepared)}"
    alternatives = alternatives_path(cfg, target, prepared)
    # LoRA starts at B = 0, so its starting model is the target itself and shares the cache.
    ref_key = content_hash(model_identity(target), prepared.fingerprint, cfg.seed, cfg.train.bf16,
                           *([alternatives.stem] if alternatives else []))
    config = cfg.model_copy(update={"methods": []}).to_dict()  # the ranks run this one method
    constants = constants_path(cfg, target, prepared)
    aux = method_auxiliary(cfg.method).get("aux")
    return run_dir, {"config": config, "target": target, "data": str(prepared.path),
                     "data_fingerprint": prepared.fingerprint, "run_dir": str(run_dir),
                     "ref_cache": str(cfg.out / "reference" / f"{ref_key}.safetensors"),
                     "alternatives": str(alternatives) if alternatives else None,
                     "aux": str(model_dir(cfg, prepared, aux)) if aux else None,
                     "constants": str(constants) if constants else None}


def constants_path(cfg: ExperimentConfig, target: str | Path, prepared: PreparedData) -> Path | None:
    """Where the per-item constants of a method that reads them (KGA) are kept: keyed by the target, the
    auxiliary models' build keys, the data, the seed and the method's parameters. None for other methods."""
    if not needs(cfg.method)["const"]:
        return None
    aux = {name: role_key(cfg, prepared, role) for name, role in sorted(method_auxiliary(cfg.method).items())}
    key = content_hash(model_identity(target), aux, prepared.fingerprint, cfg.seed, cfg.method.model_dump())
    return cfg.out / "constants" / f"{cfg.method.name}-{key}.safetensors"


def write_constants(cfg: ExperimentConfig, target: str | Path, prepared: PreparedData, path: Path) -> None:
    """Compute a method's per-item constants (`constants` of its registration) from the target and its
    auxiliary models (built here if they are not yet), once, before the launch; the live `aux` model is the
    ranks' and is not loaded."""
    if path.is_file():
        return
    import torch
    from safetensors.torch import save_file

    from unlearning.models import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load(p: str | Path) -> Any:
        return load_causal_lm(p, cfg.model.dtype, cfg.model.trust_remote_code).to(device).eval()

    fn = METHODS.get(cfg.method.name).meta["constants"]
    models = {name: load(built_model(cfg, prepared, role)[0]) for name, role in method_auxiliary(cfg.method).items()
              if name != "aux"}
    values = fn(load(target), models,
                prepared.splits(), pad_id=prepared.tokenizer().pad_token_id, batch_size=cfg.eval.batch_size,
                seed=cfg.seed, **cfg.method.params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"const": values.float().contiguous()}, str(tmp))
    os.replace(tmp, path)


ALTERNATIVE_PARAMS = ("instruct", "tries", "temperature", "max_new_tokens")


def alternatives_path(cfg: ExperimentConfig, target: str | Path, prepared: PreparedData) -> Path | None:
    """Where the alternative answers of a method that reads them (AltPO) are kept: keyed by the target,
    the data, the seed and the generation parameters. None for other methods."""
    if not needs(cfg.method)["alt"]:
        return None
    params = {k: cfg.method.params[k] for k in ALTERNATIVE_PARAMS if k in cfg.method.params}
    key = content_hash(model_identity(target), prepared.fingerprint, cfg.seed, params)
    return cfg.out / "alternatives" / f"{key}.json"


def write_alternatives(cfg: ExperimentConfig, target: str | Path, prepared: PreparedData, path: Path) -> None:
    """Have the target write one alternative answer per forget question (`data/alternatives.py`), once."""
    if path.is_file():
        return
    import torch

    from unlearning.data.alternatives import alternatives
    from unlearning.models import load_causal_lm

    tok, forget = prepared.tokenizer(), list(prepared.splits()["forget"])
    model = load_causal_lm(target, cfg.model.dtype, cfg.model.trust_remote_code)
    if torch.cuda.is_available():
        model = model.cuda()
    params = cfg.method.params
    instruct = params.get("instruct")
    written = alternatives(model, tok, cfg.data.template, forget,
                           instruct=cfg.data.template.uses_chat(tok) if instruct is None else bool(instruct),
                           tries=params["tries"], temperature=params["temperature"],
                           max_new_tokens=params["max_new_tokens"], seed=cfg.seed)
    sources = {s: sum(1 for a in written if a["source"] == s) for s in ("generated", "perturbed", "refusal")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"target": str(target), "sources": sources, "alternatives": written}, indent=1))


def unlearn(cfg: ExperimentConfig, *, prepared: PreparedData | None = None, built: BuiltModels | None = None,
            target: str | Path | None = None) -> Unlearned:
    """Unlearn the forget set from the target with `cfg.method`; reuse a finished run.

    The inputs are the prepare and build stages' results, `prepared` and `built` (each by default computed, or
    found cached, from the config), or another starting model `target` (sequential unlearning: one request's
    data, the last result).
    """
    return unlearn_many({"run": cfg}, prepared=prepared, built=built, target=target)["run"]


def unlearn_many(cfgs: Mapping[str, ExperimentConfig], *, prepared: PreparedData | None = None,
                 built: BuiltModels | None = None, target: str | Path | Mapping[str, Path] | None = None,
                 summarise: bool = True) -> dict[str, Unlearned]:
    """`unlearn` for several runs (label → config, e.g. every method of a config), starting the ranks once for
    all the unfinished runs that launch alike (`launch_group`): a start of the ranks (imports, process group,
    accelerator) costs seconds on a laptop and a minute on a cluster, and the runs follow one another in it.
    Every run's problems are reported before anything starts.

    `prepared`, `built`: the upstream stages' results, shared by every run (default: each run's config's own);
    `target`: instead of the built target, one starting model for every run or one per label (the attack stage
    relearns each attacked model); `summarise`: add the answer probabilities of the start and the result to
    each run summary (two scoring passes; the attack stage, which evaluates the results anyway, skips them)."""
    raise_if([p for cfg in cfgs.values() for p in launch_problems(cfg)])

    def shared(cfg: ExperimentConfig) -> str:  # runs of one config differ in method and train only
        return content_hash(cfg.data.model_dump(), cfg.model.model_dump(), cfg.seed, str(cfg.out))

    prepared_by: dict[str, PreparedData] = {}
    for cfg in cfgs.values():
        if shared(cfg) not in prepared_by:
            prepared_by[shared(cfg)] = prepared or prepare(cfg)
    data = {label: prepared_by[shared(cfg)] for label, cfg in cfgs.items()}
    raise_if(list(dict.fromkeys(p for label, cfg in cfgs.items() for p in data_problems(cfg, data[label]))))
    targets: dict[str, Path] = {}
    target_probs: dict[str, dict[str, float] | None] = {}
    built_by: dict[str, BuiltModels] = {}
    for label, cfg in cfgs.items():
        if target is not None:
            targets[label] = Path(target[label] if isinstance(target, Mapping) else target)
            target_probs[label] = None
            continue
        if shared(cfg) not in built_by:
            # Built on the config's own data (which given `prepared` data, e.g. a derived subset, need not be).
            built_by[shared(cfg)] = built or build_models(cfg, None if prepared else data[label])
        models = built_by[shared(cfg)]
        targets[label] = Path(models.target)
        # The built models' probabilities are on their own data: reused when the run's data is that.
        same_data = models.summary.get("data") == str(data[label].path)
        target_probs[label] = models.summary["probability"]["target"] if same_data else None
    jobs = {label: job_spec(cfg, str(targets[label]), data[label]) for label, cfg in cfgs.items()}
    pending = [label for label, (run_dir, _) in jobs.items() if not (run_dir / "run_summary.json").is_file()]
    groups: dict[tuple[Any, ...], list[str]] = {}
    for label in pending:
        groups.setdefault(launch_group(cfgs[label]), []).append(label)
    for labels in groups.values():
        for label in labels:
            if jobs[label][1]["alternatives"]:
                write_alternatives(cfgs[label], targets[label], data[label], Path(jobs[label][1]["alternatives"]))
            for role in method_auxiliary(cfgs[label].method).values():  # found built by build_models, mostly
                built_model(cfgs[label], data[label], role)
            if jobs[label][1]["constants"]:
                write_constants(cfgs[label], targets[label], data[label], Path(jobs[label][1]["constants"]))
            jobs[label][0].mkdir(parents=True, exist_ok=True)
            (jobs[label][0] / "config.yaml").write_text(dump_yaml(cfgs[label]))
        launch(cfgs[labels[0]], [(jobs[label][1], jobs[label][0]) for label in labels])
    return {label: Unlearned(run_dir / "model", run_dir, _with_probabilities(
        cfgs[label], targets[label], target_probs[label], data[label], run_dir) if summarise else
        json.loads((run_dir / "run_summary.json").read_text()), cached=label not in pending)
        for label, (run_dir, _) in jobs.items()}


def _with_probabilities(cfg: ExperimentConfig, target: Path, target_probs: dict[str, float] | None,
                        prepared: PreparedData, run_dir: Path) -> dict[str, Any]:
    """The run summary with the target's and the unlearned model's mean answer probability per split."""
    path = run_dir / "run_summary.json"
    summary = json.loads(path.read_text())
    if "probability" not in summary:
        summary["probability"] = {"target": target_probs or probabilities(target, prepared, cfg),
                                  "unlearned": probabilities(run_dir / "model", prepared, cfg)}
        write_atomic(path, json.dumps(summary, indent=2))
    return summary
