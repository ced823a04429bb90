"""Merge in bounded memory (issue 27): peak RSS and time of `appliance merge` on a random Llama-shaped model built
here (no download), next to the model's float32 size and to the old whole-model merge (PEFT's merge_and_unload on
the model loaded in float32) where that still fits.

For each shape: the model is made with random weights and saved in bfloat16, imported (`appliance models import`),
trained one QLoRA step through `appliance train` (so the adapter is a real one, saved as training saves it), then
merged by the CLI (the streaming merge and its checks), each command in a child process whose peak RSS the kernel
reports (getrusage of the children). The old path is measured by the same means on the same adapter.

    .venv/bin/python bench/merge_memory.py [--shapes 1.5b,3b] [--skip-old]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine

SHAPES = {  # hidden, intermediate, layers, heads, kv heads: SmolLM2's vocabulary (49,152), tied embeddings
    "1.5b": (2048, 5632, 32, 16, 4),
    "3b": (2560, 6912, 36, 20, 4),
}

MEASURE = ("import resource, subprocess, sys, time\n"
           "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
           "time.perf_counter() - t)\n"
           "sys.stderr.write(p.stderr[-3000:])\n")

OLD_MERGE = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
"""


def measured(cmd: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    rc, rss, seconds = out.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {out.stderr[-1500:]}")
    return {"peak_rss_bytes": int(rss), "seconds": float(seconds)}


def build(shape: str, folder: Path) -> int:
    """The random model in bfloat16 safetensors (the tokenizer: the embedded SmolLM2's); returns its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from appliance import demo, models

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        probe = LlamaForCausalLM(config)
    params = sum(p.numel() for p in probe.parameters())
    del probe
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # initialised layer by layer in float32, then halved
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2GB")
    del model
    tokenizer_dir = models.model_dir(demo.MODEL_ID)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return params


def recipe(path: Path, base: str, dataset: str) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "merge-bench", "base_model": base, "dataset": dataset, "seed": 7,
        "quantization": {"method": "nf4", "compute_dtype": "auto"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_seq_length": 64,
                     "save_steps": 1, "eval_steps": 100, "warmup_steps": 0, "learning_rate": 0.001},
        "export": {"quant": ["q8_0"], "parity_samples": 2}}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.5b")
    p.add_argument("--skip-old", action="store_true", help="do not measure the old whole-model merge")
    args = p.parse_args()
    from _common import scratch_workspace

    home = scratch_workspace()
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_PASSPHRASE_FILE": str(home / "bench-passphrase")}
    (home / "bench-passphrase").write_text("bench passphrase")
    cli = [sys.executable, "-m", "appliance.cli"]
    from appliance import demo
    from appliance.workspace import folder

    rows = []
    for shape in args.shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"merge-bench-{shape}-"))
        started = time.perf_counter()
        params = build(shape, work / "model")
        fp32 = params * 4
        print(f"{shape}: {params / 1e9:.2f}B parameters, float32 {fp32 / 2**30:.1f} GiB "
              f"(built in {time.perf_counter() - started:.0f} s)", flush=True)
        name = f"bench-{shape}"
        subprocess.run([*cli, "models", "import", str(work / "model"), "--name", name], check=True, env=env,
                       capture_output=True, cwd=ROOT)
        rec = recipe(work / "recipe.yaml", name, str(folder("datasets") / demo.DATASET_ID))
        train = subprocess.run([*cli, "train", str(rec), "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
        if train.returncode:
            raise SystemExit(f"training failed: {train.stderr[-2000:]}")
        run = json.loads(train.stdout)["id"]
        merge = measured([*cli, "merge", run, "--json"], env)
        export = measured([*cli, "export", run, "--quant", "q8_0", "--json"], env)
        row = {"shape": shape, "parameters": params, "float32_bytes": fp32, "merge": merge, "export": export}
        if not args.skip_old:
            adapter = folder("runs") / run / "adapter"
            row["old_merge"] = measured([sys.executable, "-c", OLD_MERGE, str(folder("models") / name), str(adapter),
                                         str(work / "old-merged")], env)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmachine: {machine()}")
    print(f"{'model':>6} {'params':>7} {'fp32 GiB':>9} | {'step':<22} {'peak RSS GiB':>12} {'share of fp32':>13} "
          f"{'time s':>7}")
    for r in rows:
        steps = [("merge (streaming)", r["merge"]), ("export q8_0 (+checks)", r["export"])]
        if "old_merge" in r:
            steps.append(("old merge (whole fp32)", r["old_merge"]))
        for label, m in steps:
            print(f"{r['shape']:>6} {r['parameters'] / 1e9:>6.2f}B {r['float32_bytes'] / 2**30:>9.1f} | {label:<22} "
                  f"{m['peak_rss_bytes'] / 2**30:>12.2f} {m['peak_rss_bytes'] / r['float32_bytes']:>12.0%} "
                  f"{m['seconds']:>7.0f}")
    out = ROOT / "bench" / "merge_memory.json"
    out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2)
                   + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
