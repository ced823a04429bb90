"""``appliance demo``: the whole pipeline on the embedded default model, narrated.

import the base model -> generate the demo dataset -> train QLoRA -> merge ->
export GGUF (f16, q8_0, q4_k_m, self-checked) -> score base vs tuned on the
held-out split -> answer one held-out prompt through llama.cpp. Every stage
is the same library call the CLI exposes on its own; this module only strings
them together and tells the story.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import hardware
from .errors import NotFound

MODEL_ID = "smollm2-135m-instruct"
DATASET_ID = "demo-records"


PREFERENCES_ID = "demo-preferences"


def recipe_path(name: str = "demo-cpu.yaml") -> Path:
    """A shipped demo recipe: $APPLIANCE_RECIPES, recipes/ beside the package (a checkout), or
    <prefix>/share/appliance/recipes (where the offline installer puts them)."""
    import sys

    roots = [Path(os.environ["APPLIANCE_RECIPES"])] if os.environ.get("APPLIANCE_RECIPES") else [
        Path(__file__).resolve().parents[1] / "recipes", Path(sys.prefix) / "share" / "appliance" / "recipes"]
    for root in roots:
        if (root / name).is_file():
            return root / name
    raise NotFound(f"the demo recipe is missing from {', '.join(map(str, roots))}; set APPLIANCE_RECIPES to the "
                   f"folder holding {name}.")


def run_demo(base: str | None = None, steps: int | None = None, eval_samples: int = 48, json_mode: bool = False) -> dict:
    from rich.console import Console

    from . import models, recipes, runs
    from .evaluate import evaluate
    from .export import export
    from .infer import ask
    from .merge import merge
    from .render import eval_table, follow_training, forgetting_table, quant_table, reporter
    from .trust import keys, store
    from .workspace import folder

    console = Console(quiet=json_mode, highlight=False)
    emit = reporter(json_mode)
    timings: dict[str, float] = {}

    def stage(title: str):
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    # The vault first: it holds the demo's data and the key that signs every artifact the demo makes.
    vault = _demo_vault(console)
    keys.use_vault(vault)
    t = stage("1/6 import the base model")
    gguf = Path(base) if base else models.default_gguf()
    console.print(f"{gguf.name}: a real pretrained model, dequantized into 16-bit safetensors")
    model = models.import_model(gguf, name=MODEL_ID if not base else None, emit=emit)
    timings["import"] = time.perf_counter() - t

    t = stage("2/6 the demo dataset, into the encrypted vault")
    counts = import_dataset(vault)
    console.print(f"{counts['train']} train + {counts['validation']} held-out records, encrypted in "
                  f"{folder('datasets') / DATASET_ID}")
    example = next(store.read(vault, DATASET_ID, "train"))["messages"]
    console.print("task: turn a free-text record into the house JSON format, e.g.")
    console.print(f"  [dim]user:[/] {example[0]['content']!r}")
    console.print(f"  [dim]assistant:[/] {example[1]['content']}")
    timings["dataset"] = time.perf_counter() - t

    t = stage("3/6 train QLoRA (NF4 base + LoRA on all linear layers)")
    overrides = {"base_model": model["id"], "dataset": DATASET_ID}
    if steps:
        overrides["training.max_steps"] = steps
    recipe = recipes.load(recipe_path(), **overrides)
    from . import plan as planner

    recipe, memory = planner.fitted(recipe)  # the demo fits any machine that runs it; the plan is kept with the run
    from .duration import text

    console.print(f"plan: {memory['verdict'].replace('_', ' ')}, about "
                  f"{memory['devices'][0]['estimate'] / 2**30:.1f} GiB of {memory['devices'][0]['device']}, "
                  f"{text(memory['duration']['seconds'])} of training (an estimate)")
    for c in memory["checks"]:
        console.print(f"[yellow]warning:[/] {c['message']}")
    run_id = runs.create(recipe, memory)
    console.print(f"run {run_id}: {recipe.training.max_steps} steps, micro-batch {recipe.training.micro_batch_size}, "
                  f"lr {recipe.training.learning_rate}, in a child process (events in runs/{run_id}/events.jsonl)")
    runs.start(run_id)
    follow_training(runs.follow(run_id), quiet=json_mode)
    st = runs.status(run_id)
    if st["state"] != "finished":
        from .errors import StageFailed

        raise StageFailed(f"training run {run_id} ended {st['state']}: {st['error'] or 'see ' + st['path'] + '/worker.log'}.")
    timings["train"] = time.perf_counter() - t

    t = stage("4/6 merge the adapter into the 16-bit base")
    merged = merge(run_id, emit=emit)
    timings["merge"] = time.perf_counter() - t

    t = stage("5/6 export GGUF with llama.cpp's converter and quantizer, then check it")
    exported = export(run_id, emit=emit)
    for q, f in exported["files"].items():
        console.print(f"  {q:>7}: {f['bytes'] / 2**20:6.1f} MiB, top-1 agreement with the merged model {f['top1_agreement']:.2%}")
    console.print(quant_table(exported["quality"]))
    timings["export"] = time.perf_counter() - t

    t = stage("6/6 base vs tuned on the test records, and the forgetting check, through llama.cpp")
    report = evaluate(run_id, samples=eval_samples, emit=emit)
    console.print(eval_table(report))
    console.print(forgetting_table(report["forgetting"]))
    console.print(f"[dim]the report to read:[/] {report['html']}")
    sample = next(store.read(vault, DATASET_ID, report["split"]))["messages"]
    console.print(f"[dim]ask the tuned model:[/] {sample[0]['content']!r}")
    answer = ask(run_id, sample[0]["content"], max_tokens=96)
    console.print(f"[bold green]{answer['text']}[/]  [dim]({answer['completion_tokens']} tokens, "
                  f"{answer['tokens_per_s'] or 0:.0f} tok/s)[/]")
    timings["evaluate"] = time.perf_counter() - t

    from rich.table import Table

    table = Table(title="time per stage", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, secs in timings.items():
        table.add_row(name, f"{secs:.0f}")
    table.add_row("[bold]total", f"[bold]{sum(timings.values()):.0f}")
    console.print(table)
    run = Path(st["path"])
    console.print(f"artifacts: adapter {run / 'adapter'}\n           merged  {merged['path']}\n"
                  + "".join(f"           {q:<7} {f['path']}\n" for q, f in exported["files"].items()))
    console.print(f"try: appliance ask {run_id} --prompt $'Convert this record to JSON.\\nAda Weber, 41, baker in Graz.'")
    return {"run": run_id, "model": model["id"], "timings_s": timings,
            "eval": {k: report[k] for k in ("base", "tuned", "samples", "split", "intervals", "forgetting", "html")},
            "merge": merged, "export": exported, "answer": answer, "tuned_beats_base": report["tuned_beats_base"]}


def run_dpo_demo(steps: int | None = None, eval_samples: int = 48, json_mode: bool = False) -> dict:
    """DPO after the demo: the newest finished demo SFT run (the demo runs first if there is none) trains on the
    demo preference pairs, is exported, and is scored against the SFT model on held-out pairs."""
    from rich.console import Console

    from . import recipes, runs
    from .evaluate import evaluate
    from .export import export
    from .plan import fitted
    from .render import eval_table, follow_training, reporter
    from .trust import keys

    console = Console(quiet=json_mode, highlight=False)
    emit = reporter(json_mode)
    sft = next((r for r in reversed(runs.list_runs()) if r.get("recipe") == "demo-cpu" and r["state"] == "finished"
                and (Path(r["path"]) / "gguf" / "model-f16.gguf").is_file()), None)
    if sft is None:
        console.print("no finished, exported demo run here yet: the demo runs first")
        sft = {"id": run_demo(eval_samples=eval_samples, json_mode=json_mode)["run"]}
    vault = _demo_vault(console)
    keys.use_vault(vault)
    console.rule("[bold]DPO 1/3 import the demo preference pairs")
    counts = import_preferences(vault)
    console.print(f"{PREFERENCES_ID}: {counts['train']} train + {counts['validation']} validation pairs; half the "
                  "records give no age: chosen says null, rejected invents one")
    console.rule(f"[bold]DPO 2/3 train on the pairs, starting from SFT run {sft['id']}")
    overrides = {"dpo.from_run": sft["id"], **({"training.max_steps": steps} if steps else {})}
    recipe, plan = fitted(recipes.load(recipe_path("demo-dpo.yaml"), **overrides))
    run_id = runs.create(recipe, plan)
    runs.start(run_id)
    follow_training(runs.follow(run_id), quiet=json_mode)
    st = runs.status(run_id)
    if st["state"] != "finished":
        from .errors import StageFailed

        raise StageFailed(f"training run {run_id} ended {st['state']}: {st['error'] or 'see ' + st['path'] + '/worker.log'}.")
    console.rule("[bold]DPO 3/3 export, then the SFT model vs the DPO model on held-out pairs")
    export(run_id, emit=emit)
    report = evaluate(run_id, samples=eval_samples, emit=emit)
    console.print(eval_table(report))
    return {"run": run_id, "sft_run": sft["id"], "eval": {k: report[k] for k in ("base", "tuned", "samples", "pairs")},
            "tuned_beats_base": report["tuned_beats_base"]}


def import_preferences(vault) -> dict:
    """The demo preference pairs encrypted into the vault as ``demo-preferences``, once; returns its counts."""
    from .demo_data import preference_splits

    return _import_generated(vault, PREFERENCES_ID, preference_splits(), "preference")


def import_dataset(vault) -> dict:
    """The demo dataset (generated here, no file needed) encrypted into the vault as ``demo-records``, once;
    returns its record counts per split. What `appliance demo` and the TUI's Data screen (``x``) import."""
    from .demo_data import splits

    return _import_generated(vault, DATASET_ID, splits(), "conversation")


def _import_generated(vault, dataset_id: str, parts: dict[str, list[dict]], kind: str) -> dict:
    from .trust import audit, manifest, store
    from .workspace import folder

    dataset = folder("datasets") / dataset_id
    if not store.is_encrypted(dataset):
        with store.create(vault, dataset_id, hardware=hardware.summary()) as ds:
            for split, records in parts.items():
                for record in records:
                    ds.add(split, record)
            ds.details.update(source="appliance demo generator", records_kind=kind)
        audit.record("dataset.import", {"dataset": dataset_id},
                     {"source": "appliance demo generator", "imported": sum(map(len, parts.values())), "rejected": 0})
    return manifest.read(dataset)["details"]["records"]


def _demo_vault(console):
    """The vault, created on first use: the demo's data goes where a user's would."""
    from .trust import keyring, keys, passphrase

    if keyring.exists():
        return keys.vault()
    console.print(f"creating the encrypted vault at {keyring.path()}: choose its passphrase "
                  f"(or set {passphrase.ENV} to a file holding it)")
    return keyring.init(passphrase.read(prompt="new vault passphrase: ", confirm=True))
