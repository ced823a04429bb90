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
    import platform

    import psutil

    return f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
