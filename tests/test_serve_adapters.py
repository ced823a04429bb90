"""Per-tenant adapters on one resident base ("Option B"): two runs of the tiny model exported as GGUF adapters,
served on the tiny base to two tenants, each answered through its own adapter and never the other's."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import cli_json, run_cli, write_recipe
from tests.test_serve import Served, client

# What llama.cpp computes: scripts/test.sh runs these once more on its baseline x64 kernels (issue 33).
pytestmark = pytest.mark.llama

import openai  # noqa: E402  (pinned in the test extra: missing is an error, not a skip)
PROMPTS = ["Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def two_runs(exported_workspace, demo_dataset, tmp_path_factory):
    """The session's exported run and a second one trained harder on the same base, both with GGUF adapters."""
    src, first = exported_workspace
    base = tmp_path_factory.mktemp("adapters")
    home = base / "home"
    shutil.copytree(src, home, symlinks=True)
    shutil.copyfile(src.parent / "passphrase", _passphrase(home))  # the session workspace's vault
    env = {"APPLIANCE_PASSPHRASE_FILE": str(_passphrase(home))}
    recipe = write_recipe(base / "second.yaml", demo_dataset, max_steps=10, learning_rate=0.02)
    second = cli_json("train", str(recipe), home=home, env=env)["id"]
    run_cli("export", second, "--quant", "f16", home=home, env=env)
    adapters = {run: cli_json("export", run, "--adapter", home=home, env=env) for run in (first, second)}
    return home, first, second, adapters


def _passphrase(home):
    return home.parent / "passphrase"  # written beside the workspace by the two_runs fixture


def greedy(home, gguf: str, prompt: str) -> str:
    return cli_json("ask", gguf, "--prompt", prompt, "--max-tokens", "6", home=home)["text"]


def test_export_adapter_writes_a_checked_gguf_adapter(two_runs, monkeypatch):
    home, first, second, adapters = two_runs
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    for run in (first, second):
        done = adapters[run]
        assert done["path"] == str(home / "runs" / run / "adapter-gguf" / "adapter-f16.gguf")
        assert done["top1_agreement"] >= 0.99 and done["positions"] > 0 and done["base_model"] == "tiny"
        assert cli_json("verify", done["path"], home=home)["ok"]
    from appliance.trust import audit

    assert {e["subjects"]["run"] for e in audit.entries(event="export.adapter")} >= {first, second}


def test_the_adapter_check_fails_an_adapter_that_is_not_the_runs(two_runs, monkeypatch):
    """The negative control of export --adapter's check: a converter that hands back another run's adapter (as a
    broken conversion would) is caught by the top-1 check against this run's merged model, and nothing is kept."""
    from appliance import convert, export
    from appliance.errors import CheckFailed
    from appliance.trust import keys

    home, first, second, adapters = two_runs
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    monkeypatch.setenv("APPLIANCE_PASSPHRASE_FILE", str(_passphrase(home)))
    keys.use_vault(None)
    kept = (home / "runs" / first / "adapter-gguf" / "adapter-f16.gguf").read_bytes()

    def wrong_adapter(source, base, out):
        shutil.copyfile(adapters[second]["path"], out)

    monkeypatch.setattr(convert, "convert_lora", wrong_adapter)
    with pytest.raises(CheckFailed, match="agrees with the merged model on the top-1 token at only"):
        export.export_adapter(first)
    assert (home / "runs" / first / "adapter-gguf" / "adapter-f16.gguf").read_bytes() == kept  # the good one stays
    keys.use_vault(None)


def test_two_tenants_are_served_through_their_own_adapters_on_one_base(two_runs, monkeypatch):
    home, first, second, _ = two_runs
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    made = {t: cli_json("serve", "keys", "create", "--tenant", t, home=home)["key"] for t in ("acme", "globex")}
    # What each run's own merged GGUF answers (llama-cpp-python, in process): the reference for its tenant.
    merged = {run: [greedy(home, str(home / "runs" / run / "gguf" / "model-f16.gguf"), p) for p in PROMPTS]
              for run in (first, second)}
    assert merged[first] != merged[second], "the two runs must answer differently for this test to mean anything"
    server = Served(home, "tiny", "--adapter", f"acme={first}", "--adapter", f"globex={second}", "--parallel", "2",
                    "--ctx", "256")
    try:
        for tenant, run, other in (("acme", first, second), ("globex", second, first)):
            c = client(server, made[tenant])
            assert [m.id for m in c.models.list().data] == [run]
            answers = [c.chat.completions.create(model=run, messages=[{"role": "user", "content": p}], max_tokens=6,
                                                 temperature=0).choices[0].message.content for p in PROMPTS]
            assert answers == merged[run], tenant
            with pytest.raises(openai.NotFoundError):  # the other tenant's model does not exist for this key
                c.chat.completions.create(model=other, messages=[{"role": "user", "content": "x"}], max_tokens=2)
            # A client's own `lora` field is refused: it cannot switch itself to the other tenant's adapter.
            with pytest.raises(openai.BadRequestError) as refused:
                c.chat.completions.create(
                    model=run, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6, temperature=0,
                    extra_body={"lora": [{"id": 0, "scale": 1.0 if tenant == "globex" else 0.0},
                                         {"id": 1, "scale": 1.0 if tenant == "acme" else 0.0}]})
            assert "'lora' is not accepted" in str(refused.value)
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    from appliance.trust import audit

    start = audit.entries(event="serve.start")[-1]["details"]
    assert start["mode"] == "adapters" and start["adapters"] == {"acme": first, "globex": second}
    assert {e["details"]["tenant"]: e["details"]["requests"] for e in audit.entries(event="serve.usage")} == {
        "acme": 4, "globex": 4}  # two answers, one refused model, one refused lora each


def test_an_adapter_is_served_only_on_its_own_base(two_runs):
    home, first, _, _ = two_runs
    cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    proc = run_cli("serve", "no-such-base", "--adapter", f"acme={first}", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "neither a .gguf file, a run id nor a model id" in proc.stderr
    proc = run_cli("serve", first, "--adapter", f"acme={first}", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and f"run {first} was trained on tiny, not {first}" in proc.stderr
    proc = run_cli("serve", "tiny", "--adapter", "acme=no-such-run", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "run 'no-such-run' does not exist" in proc.stderr


def test_an_edge_bundle_carries_the_adapter_and_its_serve_configuration(two_runs, tmp_path, monkeypatch):
    """The bundle holds the run's GGUF, its adapter and serve.json; on an edge box with no vault and nothing
    imported, `serve DIR` serves the bundle and `serve BASE.gguf --adapter TENANT=DIR` its adapter, and an adapter
    is refused on a base it was not trained on."""
    home, first, _, _ = two_runs
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    out = tmp_path / "edge"
    made = cli_json("bundle", first, "--out", str(out), "--quant", "f16", "--adapter", home=home,
                    env={"APPLIANCE_PASSPHRASE_FILE": str(_passphrase(home))})
    assert {"adapter-f16.gguf", "serve.json"} <= set(made["files"]) and made["adapter"]["base_model"] == "tiny"
    served = json.loads((out / "serve.json").read_text())
    assert served["model"] == {"name": first, "file": "model-f16.gguf"} and served["adapter"]["file"] == "adapter-f16.gguf"
    edge = tmp_path / "edge-box"
    checked = cli_json("bundle", "verify", str(out), "--fingerprint", made["key"], home=edge)
    assert checked["ok"] and checked["adapter"] == "adapter-f16.gguf"

    base = tmp_path / "base-f16.gguf"  # the base GGUF the edge box already has (here: the workspace's conversion)
    shutil.copyfile(home / "models" / ".gguf-tiny" / "model-f16.gguf", base)
    key = cli_json("serve", "keys", "create", "--tenant", "acme", home=edge)["key"]
    expected = greedy(home, str(home / "runs" / first / "gguf" / "model-f16.gguf"), PROMPTS[0])
    for args in ((str(out),), (str(base), "--adapter", f"acme={out}")):
        server = Served(edge, *args, "--parallel", "1", "--ctx", "256")
        try:
            c = client(server, key)
            assert [m.id for m in c.models.list().data] == [first]
            answer = c.chat.completions.create(model=first, messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=6, temperature=0).choices[0].message.content
            assert answer == expected, args
        finally:
            server.stop()
    wrong = run_cli("serve", str(out / "model-f16.gguf"), "--adapter", f"acme={out}", "--port", "0", home=edge,
                    check=False)
    assert wrong.returncode == 2 and "fits only tiny's f16 GGUF" in wrong.stderr
    (out / "serve.json").write_text((out / "serve.json").read_text().replace(first, "someone-else"))
    tampered = run_cli("serve", str(out), "--port", "0", home=edge, check=False)
    assert tampered.returncode == 3 and "serve.json" in tampered.stderr
