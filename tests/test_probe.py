"""The plan's time from a probe of this machine (issue 25): measured once per run shape and machine, cached in the
workspace, measured again when the CPU's kernels or the libraries change, and used by the plan in place of the
constant rate; within 30% of a real run's throughput."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from appliance import hardware, plan, recipes
from appliance.train import probe
from conftest import cli_json, run_events, write_recipe


@pytest.fixture(autouse=True)
def probe_on(monkeypatch):
    monkeypatch.setenv(probe.ENV_SWITCH, "on")


def _spec(tiny_model_dir, micro=4, dtype="float32"):
    recipe = recipes.from_dict({"name": "p", "base_model": "tiny", "dataset": "d",
                                "quantization": {"method": "nf4", "compute_dtype": dtype}})
    knobs = replace(plan.Knobs.from_recipe(recipe), micro_batch=micro, compute_dtype=dtype, packing=True)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    return probe.spec_for(config, knobs, recipe, threads=2, row=128, doc=40)


def test_the_probe_measures_caches_and_measures_again_on_another_machine(home, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(probe.ENV_CACHE, str(tmp_path / "throughput.json"))
    hw = hardware.detect()
    spec = _spec(tiny_model_dir)
    first = probe.measured(spec, hw)
    assert "error" not in first, first
    assert first["cached"] is False and first["micro_step_s"] > 0 and first["per_layer_s"] >= 0
    assert first["tokens"] == 4 * 120  # three 40-token documents a 128-token bin, four bins
    assert first["micro_step_s"] == round(first["fixed_s"] + first["layers"] * first["per_layer_s"], 4) or \
        abs(first["micro_step_s"] - first["fixed_s"] - first["layers"] * first["per_layer_s"]) < 1e-3
    again = probe.measured(spec, hw)
    assert again["cached"] is True and again["micro_step_s"] == first["micro_step_s"]
    # another shape is another figure
    assert probe.measured(_spec(tiny_model_dir, micro=2), hw)["cached"] is False
    # another machine (here: oneDNN capped below this CPU's bfloat16, as on an AVX2 box) measures everything again
    cap = "AVX512_CORE" if hw.cpu_capped else "AVX2"  # (the test command may already run capped at AVX2)
    assert probe.measured(spec, replace(hw, cpu_capped=cap))["cached"] is False
    cache = json.loads((tmp_path / "throughput.json").read_text())
    assert cache["machine"]["onednn_cap"] == cap and len(cache["figures"]) == 1
    # no dataset text, no model weights left behind: only figures
    assert not list((home / "cache").glob(".probe-*"))


def test_a_probe_that_cannot_run_leaves_the_constants_and_says_why(home, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(probe.ENV_CACHE, str(tmp_path / "throughput.json"))
    spec = _spec(tiny_model_dir)
    spec["config"] = {**spec["config"], "vocab_size": 10**6, "hidden_size": 4096, "intermediate_size": 14336,
                      "num_attention_heads": 32}
    out = probe.measured(spec, hardware.detect())
    assert "error" in out and "too many to measure" in out["error"]
    broken = _spec(tiny_model_dir)
    broken["config"] = {**broken["config"], "model_type": "no-such-architecture"}
    failed = probe.measured(broken, hardware.detect())
    assert failed["error"].startswith("the probe failed:")


def test_the_plan_uses_the_probe_and_the_switch_turns_it_off(tiny_home, tmp_path, demo_dataset):
    recipe = write_recipe(tmp_path / "t.yaml", demo_dataset, max_steps=6)
    d = cli_json("plan", str(recipe), home=tiny_home)["duration"]
    assert d["measured"] is True and "measured here (float32" in d["basis"] and "a probe of this machine" in d["basis"]
    off = cli_json("plan", str(recipe), home=tiny_home, env={probe.ENV_SWITCH: "off"})["duration"]
    assert off["measured"] is False and "measured here" not in off["basis"]
    # a simulated machine is not this one: never probed
    sim = cli_json("plan", str(recipe), "--simulate", "cpu-avx2", home=tiny_home)["duration"]
    assert sim["measured"] is False


def test_the_estimate_is_within_30_percent_of_a_real_run(tiny_home, tmp_path, demo_dataset):
    """The plan's tokens/s (from the probe) against what the same machine then measures while training: the run's
    own tokens/s over its steps after the first (ratios of two figures taken minutes apart on one machine; the
    end-to-end demo test checks the same on SmolLM2)."""
    recipe = write_recipe(tmp_path / "t.yaml", demo_dataset, max_steps=12, micro_batch_size=8, eval_steps=100,
                          save_steps=100)
    st = cli_json("train", str(recipe), home=tiny_home)
    assert st["state"] == "finished", st
    planned = json.loads((tiny_home / "runs" / st["id"] / "plan.json").read_text())["duration"]
    assert planned["measured"] is True
    rates = [e.data["tokens_per_s"] for e in run_events(tiny_home, st["id"])
             if e.type == "progress" and e.data.get("step", 0) > 2 and "tokens_per_s" in e.data]
    measured = statistics.median(rates)
    assert abs(planned["tokens_per_s"] / measured - 1) <= 0.30, (planned, measured)
