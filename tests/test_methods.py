"""The training methods of the guides on the tiny model: epochs, early stopping and the golden checkpoint."""

import json
import random

from conftest import cli_json, run_cli, run_events, write_recipe


def contradicting_dataset(root, n: int = 8):
    """Train and validation ask the same questions and disagree on every answer: the more a model learns the
    training split, the worse its validation loss gets, so the validation loss turns up within a few steps."""
    words = "amber birch cedar delta ember fjord grove harbor island juniper kestrel lagoon meadow nectar".split()
    root.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 1), ("validation", 2)):
        pick = random.Random(seed)
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                question = f"Name the code word for case {i}."
                answer = " ".join(pick.choice(words) for _ in range(12))
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return root


def test_early_stopping_keeps_the_best_checkpoint_and_export_uses_it(tiny_home, tmp_path):
    home = tiny_home
    data = contradicting_dataset(tmp_path / "contradicting")
    recipe = write_recipe(tmp_path / "es.yaml", data, max_steps=40, micro_batch_size=4, learning_rate=0.01,
                          eval_steps=1, save_steps=100, early_stopping={"patience": 2, "min_delta": 0.0},
                          keep_checkpoints=2)
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    run_id, s = st["id"], st["summary"]
    evals = [e.data for e in run_events(home, run_id) if e.type == "metric" and "eval_loss" in e.data]
    best = min(evals, key=lambda d: d["eval_loss"])
    # It stopped early, two evaluations after the best one, and says which checkpoint is the golden one.
    assert s["early_stopped"] and s["steps"] == best["step"] + 2 < 40
    assert s["best_checkpoint"] == f"checkpoint-{best['step']}" and s["best_eval_loss"] == best["eval_loss"]
    assert [d["best"] for d in evals[-3:]] == [True, False, False]
    # Each new best was saved; the Trainer's rotation kept the newest two (the best among them), deleting the rest
    saved = [e.data["checkpoint"] for e in run_events(home, run_id) if e.type == "metric" and "checkpoint" in e.data]
    assert len(saved) > 2 and s["best_checkpoint"] == saved[-1]
    kept = sorted(p.name for p in (home / "runs" / run_id / "checkpoints").glob("checkpoint-*"))
    assert kept == sorted(saved[-2:]), (kept, saved)
    warnings = [e for e in run_events(home, run_id) if e.type == "warning" and "overfitting" in e.data]
    assert len(warnings) == 1 and warnings[0].data["overfitting"]["best_step"] == best["step"]
    shown = run_cli("runs", "follow", run_id, home=home).stdout
    assert "warning: overfitting: validation loss rose for 2 evaluations in a row" in shown
    assert f"early stopping at step {s['steps']} of 40" in shown

    exported = cli_json("export", run_id, "--quant", "f16", home=home)
    assert exported["step"] == best["step"] and exported["checkpoint"] == s["best_checkpoint"]
    merged = json.loads((home / "runs" / run_id / "merge.json").read_text())
    assert merged["step"] == best["step"]
    lineage = cli_json("verify", str(home / "runs" / run_id / "gguf"), home=home)
    assert lineage["ok"] and ("adapter", "checkpoint", f"{run_id}/checkpoints/{s['best_checkpoint']}") in {
        (i["role"], i["kind"], i["id"]) for i in lineage["lineage"]}

    last = cli_json("merge", run_id, "--checkpoint", "last", home=home)
    assert last["checkpoint"] == "adapter" and last["step"] == s["steps"]
    wrong = run_cli("bundle", run_id, "--out", str(tmp_path / "b"), "--quant", "f16", "--checkpoint", "last",
                    home=home, check=False)
    assert wrong.returncode == 2 and f"was exported from step {best['step']}" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "b").exists()
    missing = run_cli("merge", run_id, "--checkpoint", "999", home=home, check=False)
    assert missing.returncode != 0 and "no complete, signed checkpoint at step 999" in missing.stderr
    typo = run_cli("export", run_id, "--checkpoint", "bset", home=home, check=False)
    assert typo.returncode == 2 and "is not best, last or a step number" in typo.stderr


def test_num_epochs_sets_the_length(tiny_home, tmp_path, demo_dataset):
    recipe = write_recipe(tmp_path / "epochs.yaml", demo_dataset, max_steps=None, num_epochs=2, micro_batch_size=8,
                          eval_steps=100, save_steps=100)
    planned = cli_json("plan", str(recipe), home=tiny_home)["duration"]
    st = cli_json("train", str(recipe), home=tiny_home)
    s = st["summary"]
    assert st["state"] == "finished" and s["epochs"] == 2.0 and s["steps"] == s["max_steps"] > 2
    # The plan counted the steps of two epochs from the dataset's size alone (bytes per token, packing fill).
    assert 0.5 * s["steps"] <= planned["steps"] <= 1.5 * s["steps"] and planned["seconds"] > 0


def test_a_mix_trains_on_weighted_shares_and_every_dataset_is_a_parent(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    general = tmp_path / "general.jsonl"
    with open(general, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i + 7}, in words?"},
                                             {"role": "assistant", "content": f"The sum is {2 * i + 7}."}]}) + "\n")
    domain = cli_json("data", "import", str(demo_dataset / "train.jsonl"), "--name", "domain", home=home)
    run_cli("data", "import", str(general), "--name", "general", home=home)
    n_domain = domain["imported"]["train"]
    recipe = write_recipe(tmp_path / "mix.yaml", "domain", max_steps=2, eval_steps=100, save_steps=100)
    text = recipe.read_text().replace("dataset: domain", "dataset:\n- {id: domain, weight: 0.8}\n- {id: general, weight: 0.2}")
    recipe.write_text(text)
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    mix = st["summary"]["mix"]
    total = round(n_domain / 0.8)
    assert [(m["dataset"], m["examples"]) for m in mix] == [("domain", n_domain), ("general", round(total * 0.2))]
    stage = next(e for e in run_events(home, st["id"]) if e.type == "stage" and "mix" in e.data)
    assert stage.message.startswith(f"mixing {n_domain} examples of domain (80%)")
    lineage = cli_json("verify", str(home / "runs" / st["id"]), home=home)
    assert lineage["ok"]
    found = {(i["role"], i["id"], i["status"]) for i in lineage["lineage"]}
    assert {("dataset", "domain", "ok"), ("dataset.2", "general", "ok")} <= found


def test_the_guides_checks_print_and_strict_checks_refuses(home, tmp_path, tiny_model_dir, demo_dataset):
    config = str(tiny_model_dir / "config.json")
    recipe = write_recipe(tmp_path / "rules.yaml", demo_dataset, learning_rate=0.005)
    text = recipe.read_text().replace("alpha: 16", "alpha: 128").replace("r: 8", "r: 128")
    recipe.write_text(text)
    out = run_cli("plan", str(recipe), "--model-config", config, home=home)
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 5, out.stdout
    assert any("lora.alpha is 128 with r 128" in w and "set lora.alpha: 256" in w for w in warnings)
    assert any("training.warmup_steps is 0" in w for w in warnings)
    assert any("training.learning_rate 0.005 is outside 1e-05 .. 0.001" in w for w in warnings)
    assert any("the training split has 64 examples (fewer than 500)" in w for w in warnings)
    assert "lora.r is 128 with 64 training examples" in out.stdout  # r > 64 with < 5,000 examples
    assert "time: about" in out.stdout
    planned = cli_json("plan", str(recipe), "--model-config", config, home=home)
    assert {c["key"] for c in planned["checks"]} == {"lora.alpha", "training.warmup_steps", "training.learning_rate",
                                                       "dataset", "lora.r"}
    strict = run_cli("plan", str(recipe), "--model-config", config, "--set", "training.strict_checks=true",
                     home=home, check=False)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "training.strict_checks is on and the recipe breaks 5 of the guides' rules" in strict.stderr
    clean = write_recipe(tmp_path / "clean.yaml", demo_dataset, learning_rate=2e-4, warmup_steps=1)
    ok = cli_json("plan", str(clean), "--model-config", config, home=home)
    assert [c["key"] for c in ok["checks"]] == ["dataset"]  # only the small training split is left to say


def dpo_recipe(path, dataset, from_run, **training):
    import yaml

    recipe = yaml.safe_load(write_recipe(path, dataset, **training).read_text())
    recipe.update(name="tiny-dpo", method="dpo", dpo={"beta": 0.1, "from_run": from_run})
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_dpo_from_an_sft_run_trains_merges_exports_and_raises_preference_accuracy(tiny_home, tmp_path, demo_dataset):
    from appliance.demo_data import generate_preferences

    home = tiny_home
    sft = cli_json("train", str(write_recipe(tmp_path / "sft.yaml", demo_dataset, max_steps=4, eval_steps=100,
                                             save_steps=100)), home=home)
    prefs = generate_preferences(tmp_path / "prefs", train=32, validation=16)
    recipe = dpo_recipe(tmp_path / "dpo.yaml", prefs, "tiny", max_steps=8, learning_rate=0.003, eval_steps=4,
                        save_steps=100, micro_batch_size=4)
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    run_id = st["id"]
    stages = [e.message for e in run_events(home, run_id) if e.type == "stage"]
    assert any(f"loss DPO, beta 0.1, against run {sft['id']}" in m for m in stages), stages
    progress = [e.data for e in run_events(home, run_id) if e.type == "progress" and "loss" in e.data]
    assert all("reward_margin" in d and "reward_accuracy" in d for d in progress)
    evals = [e.data for e in run_events(home, run_id) if e.type == "metric" and "eval_loss" in e.data]
    assert evals and all("eval_reward_accuracy" in d for d in evals)
    recorded = json.loads((home / "runs" / run_id / "recipe.json").read_text())
    assert recorded["dpo"]["from_run"] == sft["id"]  # the recipe's name was resolved to the run it started from

    exported = cli_json("export", run_id, "--quant", "f16", home=home)
    assert exported["parity"]["top1_agreement"] >= 0.99
    assert cli_json("ask", run_id, "--prompt", "hello", "--max-tokens", "3", home=home)["completion_tokens"] >= 1
    assert not (home / "runs" / run_id / "adapter" / "ref").exists()  # the reference copy is not kept
    lineage = cli_json("verify", str(home / "runs" / run_id / "gguf"), home=home)
    assert lineage["ok"] and ("sft_run", sft["id"], "ok") in {(i["role"], i["id"], i["status"])
                                                             for i in lineage["lineage"]}

    run_cli("export", sft["id"], "--quant", "f16", home=home)  # eval compares a DPO run with the SFT run it began from
    report = cli_json("eval", run_id, "--samples", "16", home=home)
    assert report["reference"] == f"SFT run {sft['id']}" and report["pairs"] == 16
    assert "preference_accuracy" in report["metrics"]
    # On a random 2-layer model, 8 steps move the held-out log-probability margin (chosen - rejected) up; the
    # accuracy itself is measured on the demo's SmolLM2 runs (README, "DPO").
    assert report["tuned"]["preference_margin"] > report["base"]["preference_margin"], (report["base"], report["tuned"])
    from rich.console import Console

    from appliance.render import eval_table

    console = Console(record=True, width=200)
    console.print(eval_table(report))  # what `appliance eval` prints
    shown = " ".join(console.export_text().split())  # the title may wrap
    assert "preference accuracy" in shown and "preference margin" in shown and f"base = SFT run {sft['id']}" in shown
    print(console.export_text())


def test_full_fine_tuning_trains_every_weight_merges_as_a_no_op_and_exports(tiny_home, tmp_path, demo_dataset):
    import yaml

    home = tiny_home
    path = write_recipe(tmp_path / "full.yaml", demo_dataset, quantization="none", max_steps=3, eval_steps=100,
                        save_steps=100, learning_rate=5e-5, warmup_steps=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["lora"] = None
    path.write_text(yaml.safe_dump(recipe))
    plan = cli_json("plan", str(path), home=home)
    parts, params = plan["devices"][0]["breakdown"], plan["model"]["parameters"]
    # 16 bytes a parameter: fp32 weights, fp32 gradients, AdamW's two fp32 states.
    assert parts["weights"] == parts["gradients"] == params * 4 and parts["optimizer"] == params * 8
    assert "full fine-tuning" in run_cli("plan", str(path), home=home).stdout
    st = cli_json("train", str(path), home=home)
    assert st["state"] == "finished", st
    assert st["summary"]["trainable_parameters"] == params and st["summary"]["linear_4bit"] == 0
    run = home / "runs" / st["id"]
    assert (run / "full" / "model.safetensors").is_file() and not (run / "adapter").exists()
    merged = cli_json("merge", st["id"], home=home)
    assert merged["max_abs_logit_diff"] == 0.0 and merged["checkpoint"] == "full"
    exported = cli_json("export", st["id"], "--quant", "f16", home=home)
    assert exported["parity"]["top1_agreement"] >= 0.99
    answer = cli_json("ask", st["id"], "--prompt", "hello", "--max-tokens", "3", home=home)
    assert answer["completion_tokens"] >= 1
    lineage = cli_json("verify", str(run / "gguf"), home=home)
    assert lineage["ok"] and "full-model" in {i["kind"] for i in lineage["lineage"]}

    quantized = run_cli("plan", str(path), "--set", "quantization.method=nf4", home=home, check=False)
    assert quantized.returncode == 2 and "4-bit weights cannot be trained" in quantized.stderr
    big = write_recipe(tmp_path / "big.yaml", demo_dataset, base_model="llama-3.1-8b", quantization="none")
    text = yaml.safe_load(big.read_text())
    text["lora"] = None
    big.write_text(yaml.safe_dump(text))
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "llama-3.1-8b-instruct.json"
    refused = run_cli("plan", str(big), "--model-config", str(config), "--simulate", "1x-rtx4090", home=home, check=False)
    assert refused.returncode == 3 and "LoRA instead of full fine-tuning" in refused.stdout
