"""Signed manifests and lineage: any changed byte, added or missing file, foreign key or swapped parent is caught."""

import json

import pytest

from appliance import hardware
from appliance.errors import CheckFailed
from appliance.trust import manifest, provenance, signing
from appliance.workspace import write_json
from conftest import cli_json, init_vault, run_cli


@pytest.fixture
def home(home):
    init_vault()
    return home


def _artifact(root, kind, artifact_id, parents=None, files=None, **details):
    root.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {"weights.bin": b"w" * 100}).items():
        (root / name).write_bytes(content)
    return manifest.write(root, kind, artifact_id, parents=parents, **details, hardware=hardware.summary())


def _lineage(home):
    """A workspace holding base model -> dataset -> run -> adapter -> merged -> gguf, as the pipeline makes them."""
    from appliance.trust import keys, store

    store.write(keys.vault(), "claims",
                {"train": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}, hardware=hardware.summary())
    _artifact(home / "models" / "base", "model", "base")
    run = home / "runs" / "r1"
    run.mkdir(parents=True)
    write_json(run / "recipe.json", {"name": "r"})
    write_json(run / "summary.json", {"steps": 3})
    (run / "events.jsonl").write_text("{}\n")  # a live file the run's manifest does not cover
    manifest.write(run, "run", "r1", files=["recipe.json", "summary.json"],
                   parents={"dataset": "claims", "base_model": "base"}, hardware=hardware.summary())
    _artifact(run / "adapter", "adapter", "r1/adapter", parents={"run": "r1", "base_model": "base"})
    _artifact(run / "merged", "merged-model", "r1/merged", parents={"adapter": "r1/adapter", "base_model": "base"})
    _artifact(run / "gguf", "gguf", "r1/gguf", parents={"run": "r1", "merged": "r1/merged"},
              files={"model-f16.gguf": b"GGUF" + b"\0" * 60})
    return run / "gguf"


def test_manifest_is_signed_and_records_where_it_came_from(home, tmp_path):
    m = _artifact(tmp_path / "a", "model", "a")
    assert m["signature"]["key"] == signing.fingerprint(signing.workspace_public())
    assert m["appliance_version"] and m["hardware"]["cores"] >= 1 and "gpus" in m["hardware"]
    assert manifest.verify(tmp_path / "a")["id"] == "a"


@pytest.mark.parametrize("tamper, message", [
    (lambda r: (r / "weights.bin").write_bytes(b"w" * 99 + b"x"), "does not match its sha256"),
    (lambda r: (r / "weights.bin").unlink(), "missing"),
    (lambda r: (r / "extra.bin").write_bytes(b"?"), "is not listed"),
    (lambda r: (r / manifest.NAME).write_text((r / manifest.NAME).read_text().replace('"a"', '"b"')), "bad signature"),
    (lambda r: (r / manifest.NAME).write_text(json.dumps({k: v for k, v in json.loads((r / manifest.NAME).read_text()).items()
                                                          if k != "signature"})), "is not signed"),
])
def test_any_change_to_an_artifact_is_caught(home, tmp_path, tamper, message):
    _artifact(tmp_path / "a", "model", "a")
    tamper(tmp_path / "a")
    with pytest.raises(CheckFailed, match=message):
        manifest.verify(tmp_path / "a")


def test_a_foreign_key_is_refused(home, tmp_path):
    _artifact(tmp_path / "a", "model", "a")
    _, other = signing.new_private()
    with pytest.raises(CheckFailed, match="not by the trusted key"):
        manifest.verify(tmp_path / "a", other)


def test_lineage_walks_from_a_gguf_back_to_the_dataset_and_base_model(home):
    gguf = _lineage(home)
    result = provenance.verify(gguf / "model-f16.gguf")
    assert result["ok"]
    found = {(i["role"], i["id"]): i["status"] for i in result["lineage"]}
    assert found == {("artifact", "r1/gguf"): "ok", ("merged", "r1/merged"): "ok", ("run", "r1"): "ok",
                     ("adapter", "r1/adapter"): "ok", ("base_model", "base"): "ok", ("dataset", "claims"): "ok"}


def test_a_damaged_ancestor_or_a_swapped_parent_is_named(home):
    gguf = _lineage(home)
    (home / "models" / "base" / "weights.bin").write_bytes(b"other weights")
    result = provenance.verify(gguf)
    bad = [i for i in result["lineage"] if i["status"] == "bad"]
    assert not result["ok"] and [i["id"] for i in bad] == ["base"] and "does not match" in bad[0]["problem"]
    # A validly signed replacement of a parent is still caught: the child recorded its parent's manifest hash.
    _artifact(home / "models" / "base", "model", "base", files={"weights.bin": b"other weights"})
    result = provenance.verify(gguf)
    bad = [i for i in result["lineage"] if i["status"] == "bad"]
    assert [i["id"] for i in bad] == ["base"] and "the parent was replaced" in bad[0]["problem"]


def test_cli_verify_reports_the_lineage_and_fails_on_damage(home):
    gguf = _lineage(home)
    ok = cli_json("verify", str(gguf), home=home)
    assert ok["ok"] and len(ok["lineage"]) == 6
    text = run_cli("verify", str(gguf), home=home).stdout
    assert "ok     dataset: dataset claims" in text
    (gguf / "model-f16.gguf").write_bytes(b"GGUF" + b"\1" * 60)
    bad = run_cli("verify", str(gguf), home=home, check=False)
    assert bad.returncode == 3 and "model-f16.gguf does not match its sha256" in bad.stderr
    missing = run_cli("verify", str(home / "nothing"), home=home, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_lineage_stops_where_the_workspace_ends(home, tmp_path):
    _artifact(tmp_path / "g", "gguf", "elsewhere/gguf", parents={"merged": "elsewhere/merged"})
    result = provenance.verify(tmp_path / "g")
    assert result["ok"] and result["lineage"][-1]["status"] == "absent"


def test_changing_any_byte_of_a_manifest_is_detected(home, tmp_path):
    _artifact(tmp_path / "a", "model", "a", parents={"base_model": "x"}, note="ü and more")
    path = tmp_path / "a" / manifest.NAME
    original = path.read_bytes()
    for i in range(len(original)):
        changed = bytearray(original)
        changed[i] ^= 1
        path.write_bytes(bytes(changed))
        with pytest.raises(CheckFailed):
            manifest.verify(tmp_path / "a")
    path.write_bytes(original)
    assert manifest.verify(tmp_path / "a")
