"""The whole pipeline on a tiny random model through the real CLI: train, merge, export, ask; and resume after kill -9."""

import json
import os
import signal
import time

import pytest

from conftest import cli_json, run_cli, run_events, write_recipe


@pytest.mark.llama  # the export's checks and the answer, by llama.cpp: again on x64 (issue 33)
def test_train_merge_export_ask(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset)
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    run_id, run = st["id"], home / "runs" / st["id"]
    assert st["summary"]["steps"] == 6
    # Really 4-bit: every linear layer of the 2 decoder layers (q, k, v, o, gate, up, down) holds NF4 weights.
    assert st["summary"]["quantization"] == "nf4" and st["summary"]["linear_4bit"] == 2 * 7

    evs = run_events(home, run_id)
    steps = [e.data for e in evs if e.type == "progress" and "loss" in e.data]
    assert [d["step"] for d in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "learning_rate", "grad_norm", "rss_bytes"} <= set(steps[-1])
    assert any("tokens_per_s" in d and d["tokens_per_s"] > 0 for d in steps)
    assert [e.data["step"] for e in evs if e.type == "metric" and "eval_loss" in e.data] == [3, 6]
    assert sorted(p.parent.name for p in (run / "checkpoints").glob("checkpoint-*/COMPLETE")) == ["checkpoint-3", "checkpoint-6"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    merged = cli_json("merge", run_id, home=home)
    # fp32 merge vs base+adapter: the same function, so only float rounding (~1e-6) may differ.
    assert merged["max_abs_logit_diff"] < 1e-3
    assert json.loads((run / "merge.json").read_text())["max_abs_logit_diff"] == merged["max_abs_logit_diff"]

    exported = cli_json("export", run_id, "--quant", "f16,q8_0", home=home)
    parity = exported["parity"]
    assert parity["top1_agreement"] >= 0.99 and parity["positions"] > 100
    assert parity["eot_token"] == "<|im_end|>" and parity["template_conversations"] == 4
    assert set(exported["files"]) == {"f16", "q8_0"}
    assert exported["files"]["q8_0"]["bytes"] < exported["files"]["f16"]["bytes"]
    # What the plan said the run would leave on disk, against what it left (within 10%)
    planned = cli_json("plan", str(recipe), home=home)["footprint"]
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    left = {"checkpoint": size(run / "checkpoints" / "checkpoint-3"), "merged": size(run / "merged"),
            **{q: f["bytes"] for q, f in exported["files"].items()}}
    said = {"checkpoint": planned["checkpoint"], "merged": planned["merged"], **planned["gguf"]}
    assert planned["checkpoints"] == 2 and all(abs(said[k] / left[k] - 1) < 0.1 for k in left), (said, left)

    from gguf import GGUFReader

    reader = GGUFReader(exported["files"]["q8_0"]["path"])
    template = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == parity["eot_token_id"]

    # A template that drifted from training's is caught: the same GGUF checked against a tokenizer whose
    # template was edited after training must fail with a clear message.
    import shutil

    from appliance.errors import CheckFailed
    from appliance.export import check

    drifted = tmp_path / "drifted"
    shutil.copytree(run / "merged", drifted)
    jinja = drifted / "chat_template.jinja"
    jinja.write_text(jinja.read_text() + "{# edited after training #}")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(CheckFailed, match="differs from the one used in training"):
        check(drifted, run / "gguf" / "model-f16.gguf", [conversation])

    answer = cli_json("ask", run_id, "--prompt", "Convert this record to JSON.\nAda Weber, 41, baker in Graz.",
                      "--max-tokens", "8", home=home)
    assert answer["model"].endswith("model-q8_0.gguf")
    assert answer["prompt_tokens"] > 10 and 1 <= answer["completion_tokens"] <= 8
    by_model_id = cli_json("ask", "tiny", "--prompt", "hello", "--max-tokens", "3", home=home)
    assert by_model_id["model"].endswith(".gguf-tiny/model-f16.gguf")  # the base model, converted on first use
    streamed = run_cli("ask", exported["files"]["f16"]["path"], "--prompt", "hello", "--max-tokens", "5", home=home)
    assert streamed.stdout.strip()

    chat = run_cli("chat", run_id, "--max-tokens", "4", home=home, input="hello\nand again\n\n")
    assert chat.stdout.count("model> ") == 2 and "model-q8_0.gguf" in chat.stdout

    shown = cli_json("runs", "show", run_id, home=home)
    assert shown["merge"]["max_abs_logit_diff"] == merged["max_abs_logit_diff"]
    assert shown["export"]["parity"]["top1_agreement"] == parity["top1_agreement"]

    # Provenance: the GGUF's lineage back to the base model verifies (the plain-folder dataset is outside
    # the workspace, so the walk stops there), and the audit log has every stage.
    lineage = cli_json("verify", str(run / "gguf"), home=home)
    assert lineage["ok"]
    assert {(i["role"], i["status"]) for i in lineage["lineage"]} >= {
        ("artifact", "ok"), ("merged", "ok"), ("adapter", "ok"), ("run", "ok"), ("base_model", "ok"), ("dataset", "absent")}
    from appliance.trust import audit

    assert {"model.import", "train.start", "train.finish", "merge", "export", "ask", "chat"} <= {
        e["event"] for e in audit.entries()}
    assert audit.verify()["signed_through"] >= audit.entries(event="export")[0]["seq"]
    finish = audit.entries(event="train.finish")[0]
    signed = [json.loads(line)["seq"] for line in audit.checkpoints_path().read_text().splitlines()]
    assert finish["seq"] in signed  # the training child signed its entry with the key its parent handed it

    # The edge bundle verifies on a machine with no workspace and no vault, and any changed byte is caught.
    out = tmp_path / "edge"
    made = cli_json("bundle", run_id, "--out", str(out), "--quant", "q8_0", home=home)
    assert {"model-q8_0.gguf", "chat_template.jinja", "Modelfile", "MODEL_CARD.md", "SHA256SUMS", "manifest.json",
            "signing-key.pub", "generation.json", "provenance", "serve.json"} == set(made["files"])
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
    elsewhere = {"APPLIANCE_HOME": str(tmp_path / "edge-box-home"), "APPLIANCE_PASSPHRASE_FILE": ""}
    ok = cli_json("bundle", "verify", str(out), "--fingerprint", made["key"], home=home, env=elsewhere)
    assert ok["trusted_key"] and [i["kind"] for i in ok["lineage"]][:3] == ["bundle", "gguf", "merged-model"]
    assert not (tmp_path / "edge-box-home").exists()
    typo = run_cli("bundle", "verify", str(out), "--fingerprint", made["key"][:40], home=home, env=elsewhere, check=False)
    assert typo.returncode == 2 and "is not 64 hex digits; copy it as `appliance bundle` printed it." in typo.stderr
    from appliance.bundle import verify_bundle

    for file in sorted(p for p in out.rglob("*") if p.is_file()):  # any changed byte of any file is caught
        original = file.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 1
        file.write_bytes(bytes(changed))
        with pytest.raises(CheckFailed):
            verify_bundle(out)
        file.write_bytes(original)
    (out / "extra.txt").write_text("added")
    with pytest.raises(CheckFailed, match="a file was added"):
        verify_bundle(out)
    (out / "extra.txt").unlink()
    assert verify_bundle(out)["ok"]
    blob = bytearray((out / "model-q8_0.gguf").read_bytes())
    blob[len(blob) // 2] ^= 1
    (out / "model-q8_0.gguf").write_bytes(bytes(blob))
    bad = run_cli("bundle", "verify", str(out), home=home, env=elsewhere, check=False)
    assert bad.returncode == 3 and "model-q8_0.gguf does not match its sha256 in SHA256SUMS" in bad.stderr


def test_lora_without_quantization_and_the_merge_checks_that_can_fail(tiny_home, tmp_path, demo_dataset, monkeypatch):
    home = tiny_home
    recipe = write_recipe(tmp_path / "plain.yaml", demo_dataset, quantization="none", max_steps=4, save_steps=100,
                          eval_steps=100)
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    assert st["summary"]["quantization"] == "none" and st["summary"]["linear_4bit"] == 0  # nothing quantized
    run_id = st["id"]

    from appliance import merge as merging
    from appliance.errors import CheckFailed

    # The logit check catches a merge that lost the adapter: base alone against base+adapter.
    from peft.tuners.lora import LoraModel

    with monkeypatch.context() as m:
        m.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
        with pytest.raises(CheckFailed, match="differ from base\\+adapter by"):
            merging.merge(run_id)
    assert not (home / "runs" / run_id / "merged").exists()  # nothing left under the final name
    # The per-weight check (the one that holds at any size) catches a streaming merge that dropped one update.
    real, calls = merging.merged_weight, []

    def drops_the_third(weight, update):
        calls.append(1)
        return weight.float() if len(calls) == 3 else real(weight, update)

    with monkeypatch.context() as m:
        m.setattr(merging, "merged_weight", drops_the_third)
        with pytest.raises(CheckFailed, match="is not base \\+ adapter: on random vectors"):
            merging.merge(run_id)
    assert not (home / "runs" / run_id / "merged").exists()
    done = merging.merge(run_id)
    assert done["max_abs_logit_diff"] < merging.MAX_ABS_DIFF
    assert done["weights_checked"] == 14 and done["max_weight_excess"] <= 1.0
    # kill -9 in the middle of a shard: the merged model of before stays whole under its name; the next merge
    # clears what the killed one left.
    merged = home / "runs" / run_id / "merged"
    before = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}
    killed = run_cli("merge", run_id, home=home, check=False, env={"APPLIANCE_FAULT": "kill_at:merge_mid_shard"})
    assert killed.returncode == -9
    assert {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()} == before
    assert list((home / "runs" / run_id).glob(".tmp-merged-*"))  # the killed merge's folder, never under the name
    assert cli_json("verify", str(merged), home=home)["ok"]
    cli_json("merge", run_id, home=home)
    assert not list((home / "runs" / run_id).glob(".tmp-merged-*"))

    # Base weights changed after training: the merge refuses (the logit check alone, comparing two models built
    # from the same changed files, would not see it).
    weights = home / "models" / "tiny" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1000] ^= 0x55
    weights.write_bytes(bytes(blob))
    failed = run_cli("merge", run_id, home=home, check=False)
    assert failed.returncode == 3, failed.stderr
    assert "the base model tiny changed after training" in failed.stderr and "model.safetensors" in failed.stderr


def _wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_kill_9_reaches_the_same_final_loss(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=10, save_steps=4, eval_steps=100)
    straight = cli_json("train", str(recipe), home=home)
    assert straight["state"] == "finished"

    # The worker hangs right after checkpoint-4 is complete, so the kill lands at a known point.
    started = cli_json("train", str(recipe), "--detach", home=home, env={"APPLIANCE_FAULT": "hang_after_checkpoint:4"})
    run_id = started["run"]
    _wait_for(lambda: any(e.data.get("checkpoint") == "checkpoint-4" for e in run_events(home, run_id)),
              what="checkpoint-4")
    pid = json.loads((home / "runs" / run_id / "run.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: cli_json("runs", "show", run_id, home=home)["state"] == "interrupted", what="interrupted")
    shown = cli_json("runs", "show", run_id, home=home)
    assert shown["last_checkpoint"] == "checkpoint-4" and shown["step"] == 4

    resumed = cli_json("runs", "resume", run_id, home=home)
    assert resumed["state"] == "finished", resumed
    assert resumed["summary"]["resumed_from"] == "checkpoint-4"
    assert resumed["summary"]["steps"] == 10
    assert abs(resumed["summary"]["final_loss"] - straight["summary"]["final_loss"]) <= 1e-4
    # Steps 5..10 were trained once more after the resume, and only those.
    evs = run_events(home, run_id)
    resume_at = next(i for i, e in enumerate(evs) if e.type == "stage" and e.data.get("resume"))
    assert [e.data["step"] for e in evs[resume_at:] if e.type == "progress" and "loss" in e.data] == list(range(5, 11))


def test_stop_saves_a_checkpoint_and_resume_finishes(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=8, save_steps=100, eval_steps=100)
    run_id = cli_json("train", str(recipe), "--detach", home=home,
                      env={"APPLIANCE_FAULT": "hang_after_checkpoint:never"})["run"]
    _wait_for(lambda: any(e.type == "progress" and e.data.get("step", 0) >= 2 for e in run_events(home, run_id)),
              what="step 2")
    assert cli_json("runs", "stop", run_id, home=home)["stopped"] is True
    _wait_for(lambda: cli_json("runs", "show", run_id, home=home)["state"] == "interrupted", what="stop")
    shown = cli_json("runs", "show", run_id, home=home)
    assert shown["last_checkpoint"] is not None  # a stop saves where it stopped: nothing is lost
    assert cli_json("runs", "resume", run_id, home=home)["state"] == "finished"


def test_training_from_the_vault_leaves_no_plaintext_on_disk(tiny_home, tmp_path):
    """Train, merge, export and ask from an encrypted dataset whose every record carries a canary; then scan the
    workspace, the processes' temporary directory and their home directory: the canary is nowhere."""
    import secrets

    from appliance.demo_data import splits
    from appliance.trust import keyring, store

    home = tiny_home
    canary = f"CANARY-{secrets.token_hex(8)}"  # made at run time, so no source file or log of the test holds it
    vault = keyring.unlock("correct horse")
    parts = splits(train=48, validation=8)
    for part in parts.values():
        for r in part:
            r["messages"][0]["content"] += f" ({canary})"
    store.write(vault, "secret", parts, hardware={})
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    tmp, user_home = tmp_path / "tmp", tmp_path / "user-home"
    tmp.mkdir()
    user_home.mkdir()
    env = {"APPLIANCE_PASSPHRASE_FILE": str(pw), "TMPDIR": str(tmp), "HOME": str(user_home)}
    recipe = write_recipe(tmp_path / "tiny.yaml", "secret", max_steps=4, save_steps=2, eval_steps=2)
    st = cli_json("train", str(recipe), home=home, env=env)
    assert st["state"] == "finished", st
    cli_json("merge", st["id"], home=home, env=env)
    cli_json("export", st["id"], "--quant", "f16", home=home, env=env)
    cli_json("ask", st["id"], "--prompt", "Convert this record to JSON.", "--max-tokens", "4", home=home, env=env)
    # Evaluation keeps both models' answers for a blind review, encrypted with the dataset's key.
    report = cli_json("eval", st["id"], "--samples", "3", "--judge", "tiny", home=home, env=env)
    assert report["split"] == "test" and report["judge"]["items"] == 3
    assert (home / "runs" / st["id"] / "eval-answers.c2sp").is_file()
    reviewed = run_cli("eval", st["id"], "--review", "--reviewer", "dana", "--json", home=home, env=env,
                       input="t\nt\nt\n")
    assert json.loads(reviewed.stdout)["items"] == 3
    # DPO on encrypted pairs, started from that run, exported and scored (TRL tokenizes the pairs itself).
    from appliance.demo_data import preference_splits

    pairs = preference_splits(train=16, validation=4)
    for part in pairs.values():
        for r in part:
            r["prompt"][0]["content"] += f" ({canary})"
            r["chosen"] += f" {canary}"
    store.write(vault, "secret-pairs", pairs, hardware={})
    import yaml

    raw = yaml.safe_load(write_recipe(tmp_path / "dpo.yaml", "secret-pairs", max_steps=2, save_steps=1,
                                      eval_steps=1).read_text())
    raw.update(method="dpo", dpo={"from_run": st["id"]})
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw))
    dpo = cli_json("train", str(tmp_path / "dpo.yaml"), home=home, env=env)
    assert dpo["state"] == "finished", dpo
    cli_json("export", dpo["id"], "--quant", "f16", home=home, env=env)
    assert "preference_accuracy" in cli_json("eval", dpo["id"], "--samples", "4", home=home, env=env)["tuned"]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    refused = run_cli("merge", st["id"], home=home, env={**env, "APPLIANCE_PASSPHRASE_FILE": str(wrong)}, check=False)
    assert refused.returncode == 2 and "does not open the vault" in refused.stderr
    scanned = [p for root in (home, tmp, user_home) for p in root.rglob("*") if p.is_file()]
    assert len(scanned) > 20  # the run's checkpoints, events, logs, merged model and GGUF are all in there
    assert [p for p in scanned if canary.encode() in p.read_bytes()] == []


def test_dora_trains_merges_and_exports(tiny_home, tmp_path, demo_dataset):
    """`lora.use_dora: true` on the 4-bit base: the adapter is DoRA (a trained magnitude per output), the plan
    counts it, and merge and export work on it as on any run."""
    import yaml

    home = tiny_home
    path = write_recipe(tmp_path / "dora.yaml", demo_dataset, max_steps=3, save_steps=100, eval_steps=100)
    recipe = yaml.safe_load(path.read_text())
    recipe["lora"]["use_dora"] = True
    path.write_text(yaml.safe_dump(recipe))
    plain = cli_json("plan", str(path), "--set", "lora.use_dora=false", home=home)["devices"][0]["breakdown"]
    dora = cli_json("plan", str(path), home=home)
    assert "DoRA r=8" in run_cli("plan", str(path), home=home).stdout
    parts = dora["devices"][0]["breakdown"]
    assert parts["lora"] > plain["lora"] and parts["activations"] > plain["activations"] and parts["dora_weight"] > 0
    st = cli_json("train", str(path), home=home)
    assert st["state"] == "finished", st
    run = home / "runs" / st["id"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_magnitude_vector" in name for name in f.keys())
    assert cli_json("merge", st["id"], home=home)["max_abs_logit_diff"] < 1e-3
    exported = cli_json("export", st["id"], "--quant", "f16", home=home)
    assert exported["parity"]["top1_agreement"] >= 0.99
    assert cli_json("ask", st["id"], "--prompt", "hello", "--max-tokens", "3", home=home)["completion_tokens"] >= 1

