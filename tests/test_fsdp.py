"""FSDP with QLoRA, run for real on the CPU: two gloo processes shard the tiny model's 4-bit weights (stored in the
compute dtype), the adapter and the optimizer states with PyTorch's fully_shard, against two DDP processes on the
same data; the sharded checkpoints, the gathered adapter, merge and export, and a resume from a sharded checkpoint.
(On a GPU the same code runs with NCCL; that path needs a lent GPU to be measured.)"""

import json
import math
import os
import signal
import time

from conftest import cli_json, run_cli
from test_ddp import REL_TOLERANCE, _curve, _recipe, _wait


def _fsdp_recipe(path, dataset, **training):
    import yaml

    _recipe(path, dataset, **training)
    raw = yaml.safe_load(path.read_text())
    raw["training"]["strategy"] = "fsdp"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_fsdp_matches_ddp_saves_sharded_checkpoints_with_the_adapter_and_exports(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    common = {"max_steps": 4, "save_steps": 2, "eval_steps": 100, "micro_batch_size": 2}
    ddp = cli_json("train", str(_recipe(tmp_path / "ddp.yaml", demo_dataset, **common)), "--processes", "2", home=home)
    fsdp = cli_json("train", str(_fsdp_recipe(tmp_path / "fsdp.yaml", demo_dataset, **common)), "--processes", "2",
                    home=home)
    assert ddp["state"] == fsdp["state"] == "finished", (ddp, fsdp)
    s = fsdp["summary"]
    assert (s["strategy"], s["processes"], s["effective_batch"]) == ("fsdp", 2, 4), s
    assert ddp["summary"]["strategy"] == "ddp"
    # The same examples each step; FSDP reduce-scatters the gradients where DDP all-reduces them.
    one, two = _curve(home, ddp["id"]), _curve(home, fsdp["id"])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step, (a, tokens) in one.items():
        b, tokens_fsdp = two[step]
        assert tokens_fsdp == tokens and math.isfinite(b) and abs(a - b) <= REL_TOLERANCE * abs(a), (step, a, b)

    run = home / "runs" / fsdp["id"]
    from appliance import events

    start = next(e for e in events.read(run / "events.jsonl") if e.type == "stage" and "processes" in e.data)
    assert start.data["fsdp"] and "2 FSDP processes (gloo on loopback)" in start.message
    for step in (2, 4):  # each checkpoint: the sharded state (one part per rank), and the adapter gathered whole
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir(), sorted(os.listdir(ckpt))
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "COMPLETE").is_file()
        # Only what trains: the sharded state is the adapter's size, not the 4-bit base's (issue 27).
        sharded = sum(p.stat().st_size for p in (ckpt / "pytorch_model_fsdp_0").rglob("*") if p.is_file())
        assert sharded < 3 * (ckpt / "adapter_model.safetensors").stat().st_size, sharded
    # The adapter is gathered from both shards: the same tensors, in shape, as a DDP run's adapter.
    from safetensors.torch import load_file

    a = load_file(home / "runs" / ddp["id"] / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # Merge and export take it as any run's adapter, a checkpoint's too (export checks the GGUF's top-1 parity).
    exported = cli_json("export", fsdp["id"], "--checkpoint", "2", "--quant", "f16", home=home)
    assert exported["step"] == 2 and exported["parity"]["top1_agreement"] >= 0.99, exported
    lineage = cli_json("verify", str(run / "gguf"), home=home)
    assert lineage["ok"], lineage


def test_an_fsdp_run_resumes_from_its_sharded_checkpoint(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = _fsdp_recipe(tmp_path / "fsdp.yaml", demo_dataset, micro_batch_size=2, max_steps=6, save_steps=3,
                          eval_steps=100)
    whole = cli_json("train", str(recipe), "--processes", "2", home=home)
    assert whole["state"] == "finished", whole
    started = json.loads(run_cli("train", str(recipe), "--processes", "2", "--detach", "--json", home=home,
                                 env={"APPLIANCE_FAULT": "hang_after_checkpoint:3"}).stdout)
    run = home / "runs" / started["run"]
    deadline = time.time() + 600
    while not (run / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file():
        assert time.time() < deadline, "the run never reached checkpoint-3"
        time.sleep(0.3)
    os.kill(json.loads((run / "run.json").read_text())["pid"], signal.SIGKILL)
    assert _wait(home, started["run"], timeout=60)["state"] == "interrupted"
    run_cli("runs", "resume", started["run"], "--detach", home=home)
    done = _wait(home, started["run"], states=("finished",))
    assert done["summary"]["resumed_from"] == "checkpoint-3" and done["summary"]["steps"] == 6, done["summary"]
    assert abs(done["summary"]["final_loss"] - whole["summary"]["final_loss"]) <= REL_TOLERANCE * abs(
        whole["summary"]["final_loss"])
