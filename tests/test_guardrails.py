"""Memory guardrails at run time on the tiny model: memory figures in the events, one warning past the soft
threshold, and recovery from an out-of-memory error (micro-batch halved, accumulation doubled, continued from the
last checkpoint) shown with torch's real OutOfMemoryError injected at a chosen step."""

import json
import math

from conftest import cli_json, run_events, write_recipe


def test_oom_at_step_5_halves_the_micro_batch_and_finishes(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=6, save_steps=2, eval_steps=100,
                          micro_batch_size=4)
    st = cli_json("train", str(recipe), home=home, env={"APPLIANCE_FAULT": "oom_at_step:5"})
    assert st["state"] == "finished", st
    run_id, run = st["id"], home / "runs" / st["id"]
    summary = st["summary"]
    assert summary["steps"] == 6
    assert summary["micro_batch_size"] == 2 and summary["gradient_accumulation_steps"] == 2
    assert summary["effective_batch"] == 4
    [rec] = summary["oom_recoveries"]
    assert rec["at_step"] == 5 and rec["resumed_from"] == "checkpoint-4"
    assert rec["micro_batch"] == [4, 2] and rec["gradient_accumulation"] == [1, 2]
    assert "OutOfMemoryError" in rec["error"]
    # A later `runs resume` keeps the smaller batch: it is on record beside the run.
    overrides = json.loads((run / "overrides.json").read_text())
    assert overrides["micro_batch_size"] == 2 and overrides["gradient_accumulation_steps"] == 2

    evs = run_events(home, run_id)
    warnings = [e for e in evs if e.type == "warning" and "oom_recovery" in e.data]
    assert len(warnings) == 1 and "continuing from checkpoint-4 with micro-batch 2" in warnings[0].message
    at = evs.index(warnings[0])
    # Steps 1-4 before the error; step 5 was lost (after checkpoint-4) and trained again, then step 6.
    assert [e.data["step"] for e in evs[:at] if e.type == "progress" and "loss" in e.data] == [1, 2, 3, 4]
    after = [e.data for e in evs[at:] if e.type == "progress" and "loss" in e.data]
    assert [d["step"] for d in after] == [5, 6]
    assert all(math.isfinite(d["loss"]) for d in after)
    assert math.isfinite(summary["final_loss"])

    from appliance.trust import audit

    [entry] = audit.entries(event="train.oom_recovery")
    assert entry["subjects"] == {"run": run_id}
    assert entry["details"]["micro_batch"] == [4, 2] and entry["details"]["at_step"] == 5
    assert cli_json("runs", "show", run_id, home=home)["oom_recoveries"][0]["at_step"] == 5


def test_memory_in_progress_events_and_one_warning_past_the_threshold(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=3, save_steps=100, eval_steps=100)
    # Any machine uses more than 1% of its RAM: the warning must fire, and only once.
    st = cli_json("train", str(recipe), home=home, env={"APPLIANCE_MEMORY_WARN_FRACTION": "0.01"})
    assert st["state"] == "finished", st
    evs = run_events(home, st["id"])
    steps = [e.data for e in evs if e.type == "progress" and "loss" in e.data]
    assert [d["step"] for d in steps] == [1, 2, 3]
    for d in steps:
        assert d["rss_bytes"] > 50 * 2**20
        assert 0 < d["ram_available_bytes"] < d["ram_total_bytes"]
        assert d["ram_used_bytes"] + d["ram_available_bytes"] == d["ram_total_bytes"]
    warned = [e for e in evs if e.type == "warning" and "memory" in e.data]
    assert len(warned) == 1
    w = warned[0]
    assert w.data["threshold"] == 0.01 and w.data["used_fraction"] >= 0.01 and w.data["device"] == "RAM"
    assert w.data["memory"]["rss_bytes"] > 0 and "past the 1% warning threshold" in w.message


def test_out_of_memory_at_micro_batch_1_fails_with_one_sentence(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=2, save_steps=100, eval_steps=100,
                          micro_batch_size=1)
    st = cli_json("train", str(recipe), home=home, env={"APPLIANCE_FAULT": "oom_at_step:1"}, check=False)
    assert st["state"] == "failed"
    assert "out of memory at step 1 with micro-batch 1" in st["error"]
    assert "max_seq_length" in st["error"] and "appliance plan" in st["error"]


def test_oom_detection_and_the_smaller_batch():
    import torch

    from appliance.train.callbacks import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1099511627776 bytes."))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
