"""The memory planner's accuracy: predicted vs measured peaks, side by side in one run.

1. CPU, measured here: peak RSS of real `appliance train` runs (QLoRA NF4 through TRL, in the training child)
   on a random 4-layer Llama (hidden 512) and on SmolLM2-135M, at several micro-batches, sequence lengths and
   with/without gradient checkpointing, against `appliance plan`'s estimate for the same recipe.
2. Published GPU figures (cited in appliance/plan.py's PUBLISHED): the QLoRA paper's LLaMA-7B breakdown,
   torchtune's Llama 3.1 8B on one RTX 4090, Answer.AI's fsdp_qlora Llama-2 7B.
3. GPU, measured on a lent GPU machine: rows from bench/gpu_measured.json when present
   ([{"label", "predicted", "measured"}], bytes; peak torch.cuda.max_memory_allocated of real runs).

    .venv/bin/python bench/plan_accuracy.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import machine

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Architectures of the published models (their config.json values).
CONFIGS = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
}
CPU_RUNS = [
    # (model, micro_batch, seq_len, gradient checkpointing, compute dtype)
    ("rand-512x4", 2, 128, False, "float32"),
    ("rand-512x4", 4, 256, False, "float32"),
    ("rand-512x4", 8, 512, False, "float32"),
    ("rand-512x4", 8, 512, True, "float32"),
    ("smollm2", 4, 256, False, "bfloat16"),
    ("smollm2", 8, 512, True, "bfloat16"),
]


def cpu_rows(quick: bool) -> list[dict]:
    import _memory

    root = Path(tempfile.mkdtemp(prefix="appliance-plan-accuracy-"))
    home = root / "home"
    dataset = _memory.workspace(home)
    tok = _memory.tokenizer_dir(root / "tokenizer")
    models = set()
    rows = []
    for model, mb, seq, ckpt, dtype in CPU_RUNS[:2] if quick else CPU_RUNS:
        if model not in models:
            if model == "smollm2":
                from appliance.models import default_gguf

                _memory.cli(home, "models", "import", str(default_gguf()), "--name", model)
            else:
                src = _memory.random_llama(root / model, tok, hidden=512, intermediate=1536, layers=4, heads=8)
                _memory.cli(home, "models", "import", str(src), "--name", model)
            models.add(model)
        got = _memory.measure(home, model, dataset, mb, seq, ckpt, dtype)
        plan = _memory.predicted(home, got["recipe"])
        predicted = plan["devices"][0]["estimate"]
        measured = got["summary"]["peak_rss_bytes"]
        rows.append({"model": model, "micro_batch": mb, "seq_len": seq, "grad_ckpt": ckpt, "dtype": dtype,
                     "predicted": predicted, "measured": measured, "error": predicted / measured - 1,
                     "breakdown": plan["devices"][0]["breakdown"]})
        print(f"  {model:<11}{mb:>4}{seq:>6}  {'on ' if ckpt else 'off'}  {dtype:<9}"
              f"{predicted / 2**20:>9.0f}{measured / 2**20:>10.0f}{100 * (predicted / measured - 1):>+8.1f}%", flush=True)
    return rows


def published_rows() -> list[dict]:
    from appliance import plan

    rows = []
    for item in plan.PUBLISHED:
        shape = plan.shape_from_config(CONFIGS[item["model"]], item["model"])
        parts = plan.estimate(shape, item["knobs"], "cuda")
        k = item["knobs"]
        if item["part"] == "total":
            predicted = sum(parts.values())
        elif item["part"] == "lora16":
            predicted = parts["lora"] // 2  # the paper counts adapters in 16-bit; we keep them in fp32
        elif item["part"] == "weights":
            predicted = parts["weights"] + parts["weights_16bit"]
        else:
            predicted = parts[item["part"]]
        rows.append({"source": item["source"], "predicted": predicted, "published": item["value"],
                     "error": predicted / item["value"] - 1, "micro_batch": k.micro_batch, "seq_len": k.seq_len})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two CPU runs instead of five")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    print(f"memory planner accuracy, {machine()}")
    print("\n1. CPU, measured here: peak RSS of real QLoRA training runs vs the plan (MiB)")
    print(f"  {'model':<11}{'mb':>4}{'seq':>6}  ckpt dtype    {'predicted':>9}{'measured':>10}{'error':>9}")
    cpu = cpu_rows(args.quick)
    print("\n2. published GPU figures vs the plan")
    pub = published_rows()
    for r in pub:
        print(f"  {r['source'][:96]:<96} {r['predicted'] / 2**30:>6.2f} GiB vs {r['published'] / 2**30:>6.2f}"
              f"  {100 * r['error']:>+6.1f}%")
    gpu_file = HERE / "gpu_measured.json"
    gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() else []
    print("\n3. GPU, measured on a lent GPU machine")
    if not gpu:
        print("  (none: no GPU machine was lent to the session that produced these figures)")
    for r in gpu:
        print(f"  {r['label']:<60} {r['predicted'] / 2**30:>6.2f} GiB vs {r['measured'] / 2**30:>6.2f}"
              f"  {100 * (r['predicted'] / r['measured'] - 1):>+6.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "published": pub, "gpu": gpu}, indent=2))


if __name__ == "__main__":
    main()
