"""Shared set-up for the benchmarks: a scratch workspace with the embedded model and the demo dataset."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scratch_workspace() -> Path:
    home = Path(os.environ.get("APPLIANCE_BENCH_HOME") or tempfile.mkdtemp(prefix="appliance-bench-"))
    os.environ["APPLIANCE_HOME"] = str(home)
    from appliance.cli import quiet_libraries

    quiet_libraries()
    from appliance import demo, models
    from appliance.trust import keys
    from appliance.demo_data import generate
    from appliance.trust import keyring
    from appliance.workspace import folder

    # Artifacts are signed with the vault's key: a scratch vault with a throwaway passphrase.
    keys.use_vault(keyring.unlock("bench passphrase") if keyring.exists() else
                   keyring.init("bench passphrase", kdf="pbkdf2-sha256"))
    models.import_model(models.default_gguf(), name=demo.MODEL_ID)
    if not (folder("datasets") / demo.DATASET_ID / "train.jsonl").is_file():
        generate(folder("datasets") / demo.DATASET_ID)
    return home


def machine() -> str:
    """The CPU by name and the flags that decide its speed (AVX2, AVX-512, AVX512-BF16, AMX), cores, RAM, and what
    caps its kernels: figures mean nothing without the machine they ran on (issue 25)."""
    import os

    from appliance import hardware

    hw = hardware.detect(check_bitsandbytes=False)
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "APPLIANCE_LLAMA_CPU")
            if os.environ.get(k)]
    gpus = f", GPUs: {', '.join(g.name for g in hw.gpus)}" if hw.gpus else ""
    return (f"{hardware.describe_cpu(hw)}, {hw.ram_total / 2**30:.0f} GiB, bfloat16 "
            f"{'native' if hw.cpu_bf16 else 'emulated'}{gpus}" + (f" [{', '.join(caps)}]" if caps else ""))
