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
                          eval_steps=1, save_steps=100, early_stopping={"patience": 2, "min_delta": 0.0})
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    run_id, s = st["id"], st["summary"]
    evals = [e.data for e in run_events(home, run_id) if e.type == "metric" and "eval_loss" in e.data]
    best = min(evals, key=lambda d: d["eval_loss"])
    # It stopped early, two evaluations after the best one, and says which checkpoint is the golden one.
    assert s["early_stopped"] and s["steps"] == best["step"] + 2 < 40
    assert s["best_checkpoint"] == f"checkpoint-{best['step']}" and s["best_eval_loss"] == best["eval_loss"]
    assert [d["best"] for d in evals[-3:]] == [True, False, False]
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
