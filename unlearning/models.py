"""The build-models stage: the target (knows the facts) and the retain oracle (never saw the forget set).

Both come from the same recipe and seed: a tiny Llama-architecture model built from `model.tiny` (the
embedded default) or any `from_pretrained` causal LM or GGUF file (`model.base`), fine-tuned on forget ∪ retain
(target) or retain only (oracle); for the synthetic benchmark the world-fact utility set is in both. A method
may need auxiliary models by the same recipe on other splits (KGA: the forget set, new data), trained for as
many updates as the target so that a small split is learned as well as the target learned its own.
Existing checkpoints (`model.target`, `model.oracle`) are used as they are. Built models are saved as
safetensors HF directories named by a hash of everything that went into them, so a rerun with the same
inputs skips the training and a changed config never overwrites an earlier model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearning.checkpoints import checkpoint_dir, offline_hint
from unlearning.data.prepare import PreparedData, prepare
from unlearning.data.tokenize import collate
from unlearning.errors import UserError, raise_if
from unlearning.evaluate.probes import answer_logprobs, normalised_probability
from unlearning.hashing import content_hash
from unlearning.outputs import building, publish, write_atomic
from unlearning.schema import GENERATED_SPLITS, ExperimentConfig
from unlearning.train.engine import TorchEngine
from unlearning.train.loop import nll_objective, run_loop

BUILD_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltModels:
    target: Path
    oracle: Path
    summary: dict[str, Any]
    auxiliary: dict[str, Path] = field(default_factory=dict)  # role (aux-<splits>) → the model, for KGA


def model_identity(path: str | Path) -> str:
    """A cheap content identity of a checkpoint directory: its config and its weight files' sizes/times."""
    path = Path(path)
    if path.is_file():  # a GGUF file
        return content_hash(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    if not path.is_dir():
        return content_hash(str(path))  # a hub name: the name (and the hub's revision pinning) identifies it
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    return content_hash(str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def training_splits(cfg: ExperimentConfig, role: str) -> list[str]:
    """Splits a role is fine-tuned on: target forget ∪ retain, oracle retain, an auxiliary model (`aux_role`) its
    own; the synthetic world facts stay in every one (they stand for what a pretrained base already knows)."""
    if role.startswith("aux-"):
        base = role.removeprefix("aux-").split("+")
    else:
        base = ["forget", "retain"] if role == "target" else ["retain"]
    return [*base, "world_facts"] if cfg.data.source == "synthetic" and cfg.data.synthetic.num_utility else base


def aux_role(splits: tuple[str, ...]) -> str:
    """The role name of a model the build stage fine-tunes on `splits` for a method (KGA's A_f and A_n)."""
    return "aux-" + "+".join(splits)


def method_auxiliary(method: Any) -> dict[str, str]:
    """The auxiliary models a configured method (a `MethodConfig`) needs: its name for each → role; {} for most."""
    from unlearning.methods import METHODS

    spec = METHODS.get(method.name).meta.get("auxiliary")
    return {} if spec is None else {name: aux_role(splits) for name, splits in spec(method.params).items()}


def auxiliary_roles(cfg: ExperimentConfig) -> list[str]:
    """The roles of the auxiliary models every trained run of the config needs, each once, in order."""
    from unlearning.config import trained_runs

    return list(dict.fromkeys(role for run in trained_runs(cfg).values()
                              for role in method_auxiliary(run.method).values()))


def training_seed(cfg: ExperimentConfig) -> int:
    """Seed of a built model's initialisation and data order."""
    return cfg.seed if cfg.model.finetune.seed is None else cfg.model.finetune.seed


def tiny_llama(cfg: ExperimentConfig, tokenizer: Any) -> Any:
    """A randomly initialised Llama model sized by `model.tiny`, its vocabulary fitted to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads or t.num_heads, max_position_embeddings=cfg.data.max_length,
        tie_word_embeddings=t.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(training_seed(cfg))
    return LlamaForCausalLM(config)


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, *,
                   quantization: Any = None, device: Any = None) -> Any:
    """Load any HF causal LM (safetensors weights) by name or path, or from a GGUF file (converted once);
    `quantization`: a transformers quantization config, the model then placed on `device` as it loads (a
    quantized model cannot be moved after)."""
    from transformers import AutoModelForCausalLM

    placed = {"quantization_config": quantization, "device_map": str(device or "cpu")} if quantization else {}
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True, **placed)
        model, info = loaded
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load a causal LM from {str(path)!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    raise_if(loading_problems(path, type(model).__name__, info))
    for module in model.modules():
        # bitsandbytes' fused CPU 4-bit kernel, taken only on CPUs with AVX512-BF16, rounds the activations and the
        # block scales to bf16 whatever the compute dtype: the attack would then mean one thing on an AMD EPYC and
        # another on an older Intel. Its standard path dequantizes the blocks and multiplies in the compute dtype on
        # every CPU, as on CUDA.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (not a declared attribute)
    return model


def loading_problems(path: str | Path, architecture: str, info: dict[str, Any]) -> list[str]:
    """Weights that do not fit the checkpoint's config.json: transformers would fill the missing ones at random
    and drop the unexpected ones, and the run would go on with a model that is not the checkpoint."""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in info.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return []
    shown = "; ".join(f"{what}: {len(keys)} (e.g. {', '.join(sorted(keys)[:3])})" for what, keys in
                      (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys)
    return [f"{path}: its weights do not fit its config.json ({architecture}): {shown}. The config.json is of "
            "another architecture or size than the weights; put the checkpoint's own config.json beside them"]


def model_configs(cfg: ExperimentConfig) -> tuple[dict[str, Any], list[str]]:
    """The HF config of every model the run loads (no weights read), or a problem per missing one."""
    from transformers import AutoConfig

    sources = {"model.target": cfg.model.target, "model.oracle": cfg.model.oracle,
               "model.base": None if cfg.model.base == "tiny" else cfg.model.base}
    configs, problems = {}, []
    for key, src in sources.items():
        if not src:
            continue
        try:
            configs[key] = (src, AutoConfig.from_pretrained(checkpoint_dir(src),
                                                            trust_remote_code=cfg.model.trust_remote_code))
        except UserError as e:
            problems.append(f"{key}: {e}")
            continue
        except Exception as e:
            problems.append(f"{key}: " + (offline_hint(src) or (
                f"no model config at {src!r} ({type(e).__name__}); give an HF checkpoint directory (with "
                "config.json) or a valid model name")))
            continue
        problems += [f"{key}: {p}" for p in weight_problems(Path(checkpoint_dir(src)))]
    return configs, problems


def weight_problems(path: Path) -> list[str]:
    """A local checkpoint's safetensors weights are there and whole (a copy cut short is found now, not after
    the other models were built); `.bin` weights are refused with the way to convert them."""
    if not path.is_dir():
        return []  # a hub name: transformers fetches and checks it
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        return [f"{path} has no .safetensors weights" + (
            f", only {', '.join(bins)}: pickled weights are refused (loading one can run code). Convert once: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{path}')"
            f".save_pretrained('{path}', safe_serialization=True)\"" if bins else "")]
    return [p for f in files if (p := safetensors_problem(f))]


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header's tensors end past the file's end), or None."""
    from unlearning.merge.safetensors_io import read_header

    try:
        end = max((t.offset + t.nbytes for t in read_header(path).values()), default=0)
    except Exception as e:  # struct, JSON, dtype or shape errors of a damaged header
        return f"{path} is not a readable safetensors file ({type(e).__name__}); copy it again"
    actual = path.stat().st_size
    if actual < end:
        return (f"{path} is cut short: {actual} bytes, its header says {end}; the copy or download was "
                "interrupted: copy it again")
    return None


def vocab_problems(configs: dict[str, Any], tokenizer: Any) -> list[str]:
    """The tokenizer's ids must fit the embedding of every model we will load."""
    problems = []
    for key, (src, mcfg) in configs.items():
        vocab = int(getattr(mcfg, "vocab_size", None) or getattr(mcfg.get_text_config(), "vocab_size", None) or 0)
        if len(tokenizer) > vocab:
            problems.append(f"{key}: the tokenizer has {len(tokenizer)} tokens but {src!r} embeds only {vocab}; "
                            "use the model's own tokenizer (unset data.tokenizer.name) or resize the model")
    return problems


def _batches(rows: list[dict[str, Any]], batch_size: int, pad_id: int, seed: int):
    """Endless micro-batches, reshuffled every epoch from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(rows))
    while True:
        perm = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(perm) - size + 1, size):  # the last partial batch is dropped
            yield collate([rows[j] for j in perm[i:i + size]], pad_id)


def finetune(cfg: ExperimentConfig, prepared: PreparedData, role: str, out: Path) -> dict[str, Any]:
    """Fine-tune a fresh base model on the role's splits and save it (atomically) to `out`."""
    splits, tokenizer = prepared.splits(), prepared.tokenizer()
    rows = [r for s in training_splits(cfg, role) for r in splits[s]]
    ft = cfg.model.finetune
    model = tiny_llama(cfg, tokenizer) if cfg.model.base == "tiny" else load_causal_lm(
        cfg.model.base, cfg.model.dtype, cfg.model.trust_remote_code)
    steps_per_epoch = max(1, len(rows) // ft.batch_size)
    total = steps_per_epoch * ft.epochs
    if role.startswith("aux-"):  # as many updates as the target's: a small split learned as well as the target's
        target_rows = sum(len(splits[s]) for s in training_splits(cfg, "target"))
        total = max(total, max(1, target_rows // ft.batch_size) * ft.epochs)
    engine = TorchEngine(model, lr=ft.lr, weight_decay=ft.weight_decay, max_grad_norm=ft.max_grad_norm,
                         grad_accum=1, total_steps=total, warmup_ratio=ft.warmup_ratio)
    result = run_loop(engine, _batches(rows, ft.batch_size, tokenizer.pad_token_id, training_seed(cfg)), nll_objective,
                      max_steps=total, grad_accum=1, desc=f"build {role}")
    info = {"role": role, "splits": training_splits(cfg, role), "examples": len(rows), "steps": result.steps,
            "epochs": round(total / steps_per_epoch, 2),
            "final_loss": float(np.mean([h["loss"] for h in result.history[-steps_per_epoch:]])),
            "wall_s": round(result.wall_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
            "data_fingerprint": prepared.fingerprint}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "build.json").write_text(json.dumps(info, indent=2))  # written last: marks a complete model
    publish(tmp, out)
    return info


def probabilities(model_dir: Path, prepared: PreparedData, cfg: ExperimentConfig) -> dict[str, float]:
    """Mean length-normalised answer probability of a model on the splits runs train on and against (forget,
    retain, holdout, world_facts): the quick check every stage prints. Further evaluation sets (TOFU's real ones,
    scored as a choice among perturbed answers) are the evaluation's, which would score them again anyway."""
    model = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    splits, pad = prepared.splits(), prepared.tokenizer().pad_token_id
    out = {}
    for name in [s for s in GENERATED_SPLITS if s in splits]:
        logp, n = answer_logprobs(model, splits[name], pad_id=pad, batch_size=cfg.eval.batch_size)
        out[name] = round(float(normalised_probability(logp, n).mean()), 4)
    return out


def _cached_probabilities(cfg: ExperimentConfig, paths: dict[str, Path], prepared: PreparedData
                          ) -> dict[str, dict[str, float]] | None:
    """The probabilities of the last summary when it describes these very models and data."""
    path = cfg.out / "models" / "summary.json"
    if not path.is_file():
        return None
    last = json.loads(path.read_text())
    identity = last.get("identity", {})
    same = last.get("data") == str(prepared.path) and all(
        last.get(role) == str(p) and identity.get(role) == model_identity(p) for role, p in paths.items())
    return last["probability"] if same else None


def role_key(cfg: ExperimentConfig, prepared: PreparedData, role: str) -> str:
    """Everything a built model depends on: the name of its directory."""
    return content_hash(BUILD_VERSION, prepared.fingerprint, cfg.model.base, cfg.model.tiny.model_dump(),
                        cfg.model.finetune.model_dump(), cfg.model.dtype, cfg.seed, training_splits(cfg, role),
                        *(["the target's updates"] if role.startswith("aux-") else []))


def build_key(cfg: ExperimentConfig, prepared: PreparedData) -> str:
    """The build stage's key: each role's built-model key, or the identity of the checkpoint given for it, and
    the auxiliary models' keys where a method needs some."""
    aux = sorted(auxiliary_roles(cfg))
    return content_hash({role: model_identity(given) if (given := getattr(cfg.model, role)) else
                         role_key(cfg, prepared, role) for role in ("target", "oracle")},
                        *([{role: role_key(cfg, prepared, role) for role in aux}] if aux else []))


def build_models(cfg: ExperimentConfig, prepared: PreparedData | None = None) -> BuiltModels:
    """Build (or reuse) the target and the retain oracle on `prepared` (default: the config's prepared data);
    write `models/summary.json`."""
    configs, problems = model_configs(cfg)
    raise_if(problems)
    prepared = prepared or prepare(cfg)
    raise_if(vocab_problems(configs, prepared.tokenizer()))

    paths, built = {}, {}
    for role in ("target", "oracle"):
        given = getattr(cfg.model, role)
        if given:
            paths[role] = Path(checkpoint_dir(given))
            continue
        paths[role], built[role] = built_model(cfg, prepared, role)
    aux = {role: built_model(cfg, prepared, role) for role in auxiliary_roles(cfg)}
    built.update({role: info for role, (_, info) in aux.items()})

    start = time.perf_counter()
    probs = _cached_probabilities(cfg, paths, prepared) or {
        role: probabilities(p, prepared, cfg) for role, p in paths.items()}
    summary = {"target": str(paths["target"]), "oracle": str(paths["oracle"]), "data": str(prepared.path),
               "identity": {role: model_identity(p) for role, p in paths.items()}, "builds": built,
               "probability": probs, "probe_s": round(time.perf_counter() - start, 2),
               **({"auxiliary": {role: str(p) for role, (p, _) in aux.items()}} if aux else {})}
    (cfg.out / "models").mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.out / "models" / "summary.json", json.dumps(summary, indent=2))
    return BuiltModels(paths["target"], paths["oracle"], summary, {role: p for role, (p, _) in aux.items()})


def model_dir(cfg: ExperimentConfig, prepared: PreparedData, role: str) -> Path:
    """Where the model of `role` built by the recipe is kept (named by `role_key`), built or not."""
    return cfg.out / "models" / f"{role}-{role_key(cfg, prepared, role)}"


def built_model(cfg: ExperimentConfig, prepared: PreparedData, role: str) -> tuple[Path, dict[str, Any]]:
    """The model of `role` fine-tuned from the base by the recipe (built now, or found built): its directory
    and its build record (`cached`: whether it was there)."""
    out = model_dir(cfg, prepared, role)
    if not (out / "build.json").is_file():
        with building(out):  # the same model wanted by a concurrent run: built once, the other waits
            if not (out / "build.json").is_file():
                return out, {**finetune(cfg, prepared, role, out), "cached": False}
    return out, {**json.loads((out / "build.json").read_text()), "cached": True}
