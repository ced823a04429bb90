"""Model import: GGUF and Hugging Face folders, and every way it must refuse."""

import json
import shutil

import pytest

from conftest import cli_json, init_vault, run_cli


@pytest.fixture
def home(home):
    init_vault()  # imported models get a signed manifest: the signing key lives in the vault
    return home


def test_import_hf_folder_writes_manifest_and_lists(home, tiny_model_dir):
    m = cli_json("models", "import", str(tiny_model_dir), "--name", "tiny", home=home)
    assert m["id"] == "tiny" and m["details"]["architecture"] == "LlamaForCausalLM"
    folder = home / "models" / "tiny"
    assert set(m["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    from appliance.trust import manifest
    from appliance.workspace import home as _  # noqa: F401  (APPLIANCE_HOME is set by the fixture)

    manifest.verify(folder)
    assert [x["id"] for x in cli_json("models", "list", home=home)["models"]] == ["tiny"]
    # Importing the same folder again is a no-op; a different one under the same id is refused.
    assert cli_json("models", "import", str(tiny_model_dir), "--name", "tiny", home=home)["id"] == "tiny"


def test_same_id_different_model_is_refused(home, tiny_model_dir, tmp_path):
    run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", home=home)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    p = run_cli("models", "import", str(other), "--name", "tiny", home=home, check=False)
    assert p.returncode != 0 and "already imported as 'tiny'" in p.stderr and "--name" in p.stderr


def test_pickle_only_folder_is_refused(home, tiny_model_dir, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    p = run_cli("models", "import", str(bad), home=home, check=False)
    assert p.returncode == 2
    assert "only pickle weights (pytorch_model.bin)" in p.stderr and "safetensors" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (home / "models" / "pickled").exists()


def test_remote_code_folder_is_refused(home, tiny_model_dir, tmp_path):
    bad = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="my_custom_arch", auto_map={"AutoModelForCausalLM": "modeling_custom.MyModel"})
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    p = run_cli("models", "import", str(bad), home=home, check=False)
    assert p.returncode == 2 and "remote code" in p.stderr and "Traceback" not in p.stderr


def test_corrupt_gguf_is_refused_and_leaves_nothing(home, tmp_path):
    from appliance.models import default_gguf

    cut = tmp_path / "cut.gguf"
    with open(default_gguf(), "rb") as src:
        cut.write_bytes(src.read(1 << 20))  # a copy cut off after 1 MiB
    p = run_cli("models", "import", str(cut), home=home, check=False)
    assert p.returncode == 2 and str(cut) in p.stderr and "corrupt" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_not_a_gguf_and_missing_path(home, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    p = run_cli("models", "import", str(fake), home=home, check=False)
    assert p.returncode == 2 and "GGUF magic" in p.stderr
    p = run_cli("models", "import", str(tmp_path / "nothing"), home=home, check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_import_embedded_gguf_dequantizes_to_bf16(home):
    """The real path: the embedded Q4_1 GGUF becomes a bf16 safetensors model with its chat template."""
    from appliance.models import default_gguf

    m = cli_json("models", "import", str(default_gguf()), "--name", "smol", home=home)
    d = m["details"]
    assert (d["architecture"], d["dtype"], d["num_layers"], d["source"]["format"]) == ("LlamaForCausalLM", "bfloat16", 30, "gguf")
    assert 130e6 < d["parameters"] < 140e6
    folder = home / "models" / "smol"
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config.get("quantization_config") is None and config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        assert f.metadata() is None or "quantization" not in str(f.metadata())
