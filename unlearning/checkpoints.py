"""Where a model comes from: an HF hub name or checkpoint directory as it is, or a GGUF file converted once.

A GGUF file (`model.base: path/to/model.gguf`, or a directory holding exactly one `.gguf` and no
`config.json`) is loaded by transformers with the `gguf` package, dequantised to float32 and saved as a
safetensors checkpoint with its own tokenizer (vocabulary, EOS and chat template come from the file's
metadata). The conversion is keyed by the file's SHA-256, so it runs once per distinct file however it is
named or moved, under `$UNLEARNING_CACHE/gguf/` (default `~/.cache/unlearning/gguf/`). Every loader
(model, config, tokenizer) passes its source through `checkpoint_dir`, so the rest of the code only ever
sees HF checkpoint directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from unlearning.errors import UserError

GGUF_CONVERSION = 1  # bump when the conversion changes, so older converted checkpoints are not reused


def cache_root() -> Path:
    """The directory converted checkpoints live under."""
    return Path(os.environ.get("UNLEARNING_CACHE") or Path.home() / ".cache" / "unlearning")


def gguf_file(spec: str | Path) -> Path | None:
    """The GGUF file a model source names, or None when it is a hub name or an HF checkpoint directory."""
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"no GGUF file at {str(path)!r}; check the path (`make models` fetches SmolLM2 into "
                            ".cache/models)")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                            "name the one to use")
        return found[0] if found else None
    return None


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(path: Path, cache: Path | None = None) -> Path:
    """The safetensors checkpoint of a GGUF file, converted on first use and reused by content after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(path)
    out = (cache or cache_root()) / "gguf" / f"{path.stem}-{digest[:16]}-v{GGUF_CONVERSION}"
    if (out / "conversion.json").is_file():
        return out
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    except ImportError as e:
        raise UserError(f"reading {str(path)!r} needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:
        raise UserError(f"could not load a causal LM from the GGUF file {str(path)!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    # The weights are now plain float32 tensors; saving them as "GGUF-quantised" would fail or mislabel them.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute by transformers)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "conversion.json").write_text(json.dumps(  # written last: marks a complete conversion
        {"source": str(path.resolve()), "sha256": digest, "conversion": GGUF_CONVERSION}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process converted the same file meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def offline_hint(spec: str | Path) -> str | None:
    """The fix when `spec` names a hub model (no local path) and the hub is switched off (HF_HUB_OFFLINE), else
    None."""
    text = str(spec)
    hub_id = not text.startswith(("/", ".", "~")) and text.count("/") <= 1  # "gpt2", "org/name"
    if not hub_id or Path(spec).exists() or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        return None
    return (f"{str(spec)!r} is not a local path and the hub is offline (HF_HUB_OFFLINE is set): download the model "
            "where the hub is reachable and point at its directory, or unset HF_HUB_OFFLINE")


def checkpoint_dir(spec: str | Path) -> str:
    """What `from_pretrained` should read for a model source: GGUF files become their converted checkpoint."""
    found = gguf_file(spec)
    return str(convert_gguf(found)) if found else str(spec)
