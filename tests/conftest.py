"""Shared fixtures: an isolated workspace per test, the real CLI, and a tiny random model.

The tiny model is a 2-layer Llama with SmolLM2's real tokenizer and chat
template (taken from the embedded GGUF), so everything around the weights
(templates, stop tokens, llama.cpp's converter and tokenizer) is the real
thing, while training takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLIANCE = [sys.executable, "-m", "appliance.cli"]

# No test may touch a real workspace (the user's default one, or one named in the shell): tests without the
# `home` fixture get a scratch workspace, set before the appliance is first imported.
os.environ["APPLIANCE_HOME"] = _SCRATCH = tempfile.mkdtemp(prefix="appliance-tests-")
# The plan's throughput probe measures this machine once per run shape; its figures are shared by every test's
# workspace in this session (a real user's workspace keeps its own), so the suite probes each shape once.
_PROBES = tempfile.mkdtemp(prefix="appliance-probes-")
os.environ.setdefault("APPLIANCE_PROBE_CACHE", os.path.join(_PROBES, "throughput.json"))
# ... and it is off unless a test turns it on (tests/test_probe.py, the end-to-end demo, PROBE_ON): a probe costs
# seconds per run shape, and most tests plan shapes of their own whose time nobody reads.
os.environ.setdefault("APPLIANCE_THROUGHPUT_PROBE", "off")
PROBE_ON = {"APPLIANCE_THROUGHPUT_PROBE": "on"}


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for scratch in (_SCRATCH, _PROBES):
        shutil.rmtree(scratch, ignore_errors=True)


PASSPHRASE = "correct horse"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty workspace (no vault yet); APPLIANCE_PASSPHRASE_FILE holds PASSPHRASE for when one is created."""
    from appliance.trust import keys
    from appliance.trust import signing

    h = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(h))
    pw = tmp_path / "passphrase"
    pw.write_text(PASSPHRASE)
    monkeypatch.setenv("APPLIANCE_PASSPHRASE_FILE", str(pw))
    # Unlocked state is per process and per workspace: never carry one test's keys into the next.
    signing.use(None)
    keys.use_vault(None)
    yield h
    signing.use(None)
    keys.use_vault(None)


def init_vault():
    """Create the workspace's vault (PBKDF2, the fastest KDF to open) and keep it unlocked in this process.

    Anything that makes an artifact needs one: the appliance signs every manifest with the key its vault keeps.
    A test module whose tests all make artifacts overrides ``home`` with ``init_vault(); return home``."""
    from appliance.trust import keys
    from appliance.trust import keyring

    vault = keyring.init(PASSPHRASE, kdf="pbkdf2-sha256")
    keys.use_vault(vault)
    return vault


@pytest.fixture
def vault_home(home) -> Path:
    init_vault()
    return home


def run_cli(*args: str, home: Path, check: bool = True, env: dict | None = None, timeout: int = 900,
            input: str | None = None):
    """Run the real `appliance` command in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, "APPLIANCE_HOME": str(home), **(env or {})}
    proc = subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          input=input if input is not None else "")
    if check and proc.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str, home: Path, **kw) -> dict:
    return json.loads(run_cli(*args, "--json", home=home, **kw).stdout)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template, extracted from the embedded GGUF once per session."""
    from transformers import AutoTokenizer

    from appliance.models import default_gguf

    gguf = default_gguf()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A random 2-layer Llama (hidden 128) saved as a Hugging Face folder in safetensors."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
        # Larger than the usual 0.02 so the random model's logits have clear winners: the export's top-1 parity
        # check is then about the conversion, not about ties between near-equal logits.
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in smollm2_tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from appliance.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo-dataset"), train=64, validation=8, test=8)


def write_recipe(path: Path, dataset: Path, base_model: str = "tiny", *, quantization: str = "nf4",
                 **training) -> Path:
    import yaml

    t = {"max_steps": 6, "micro_batch_size": 4, "learning_rate": 0.003, "max_seq_length": 128, "save_steps": 3,
         "eval_steps": 3, "warmup_steps": 0, **training}
    recipe = {"name": "tiny", "base_model": base_model, "dataset": str(dataset), "seed": 7,
              "quantization": {"method": quantization, "compute_dtype": "float32"},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "training": t,
              "export": {"quant": ["f16", "q8_0"], "parity_samples": 4}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def documented_decryptor():
    """The minimal decryptor printed in docs/vault-format.md, executed as written."""
    doc = (ROOT / "docs/vault-format.md").read_text()
    code = doc.split("### A minimal decryptor", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    return namespace["decrypt"]


@pytest.fixture
def tiny_home(vault_home, tiny_model_dir) -> Path:
    """A workspace with a vault and the tiny model imported as `tiny`."""
    run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", home=vault_home)
    return vault_home


def run_events(home: Path, run_id: str):
    from appliance import events

    return events.read(home / "runs" / run_id / "events.jsonl")


@pytest.fixture(scope="session")
def exported_workspace(tmp_path_factory, tiny_model_dir, demo_dataset) -> tuple[Path, str]:
    """A workspace made once per session through the real CLI: a vault, the tiny model as `tiny`, one finished
    6-step run on the demo dataset, merged and exported to f16 and q8_0 GGUF. Use ``exported_home`` for a copy."""
    base = tmp_path_factory.mktemp("exported")
    ws = base / "home"
    pw = base / "passphrase"
    pw.write_text(PASSPHRASE)
    env = {"APPLIANCE_PASSPHRASE_FILE": str(pw)}
    run_cli("vault", "init", "--kdf", "pbkdf2-sha256", home=ws, env=env)
    run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", home=ws, env=env)
    recipe = write_recipe(base / "tiny.yaml", demo_dataset)
    run_id = cli_json("train", str(recipe), home=ws, env=env)["id"]
    run_cli("export", run_id, "--quant", "f16,q8_0", home=ws, env=env)
    return ws, run_id


@pytest.fixture
def exported_home(home, exported_workspace) -> tuple[Path, str]:
    """A private copy of ``exported_workspace`` as this test's workspace, its vault unlocked in this process;
    returns (home, run id)."""
    import shutil

    from appliance.trust import keys
    from appliance.trust import keyring

    src, run_id = exported_workspace
    shutil.copytree(src, home, symlinks=True)
    keys.use_vault(keyring.unlock(PASSPHRASE))
    return home, run_id
