"""The memory planner's accuracy: predicted vs measured peaks, side by side in one run.

1. CPU, measured here: peak RSS of real `appliance train` runs (QLoRA NF4 through TRL, in the training child)
   on a random 4-layer Llama (hidden 512) and on SmolLM2-135M, at several micro-batches, sequence lengths and
   with/without gradient checkpointing, against `appliance plan`'s estimate for the same recipe.
2. Published GPU figures (cited in appliance/plan.py's PUBLISHED): the QLoRA paper's LLaMA-7B breakdown,
   torchtune's Llama 3.1 8B on one RTX 4090, Answer.AI's fsdp_qlora Llama-2 7B.
3. GPU, measured on lent GPU machines: the rows of bench/gpu_measured.json (bench/gpu_probe.py appends them) against
   the planner as it is now. Measured = peak torch.cuda.max_memory_reserved of the training process + its memory
   outside the allocator (CUDA context, cuBLAS, kernels): what an out-of-memory error is decided on.

    .venv/bin/python bench/plan_accuracy.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _memory
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
    "tiny-512x4": {**_memory.TINY_LLAMA, "vocab_size": 49152},
}
CPU_RUNS = [
    # (model, micro_batch, seq_len, gradient checkpointing, compute dtype, packing, method)
    ("rand-512x4", 2, 128, False, "float32", True, "sft"),
    ("rand-512x4", 4, 256, False, "float32", True, "sft"),
    ("rand-512x4", 8, 512, False, "float32", True, "sft"),
    ("rand-512x4", 8, 512, False, "float32", False, "sft"),
    ("rand-512x4", 8, 512, True, "float32", True, "sft"),
    ("rand-512x4", 4, 256, False, "float32", False, "dpo"),   # a chosen and a rejected sequence per pair
    ("rand-512x4", 4, 256, False, "float32", True, "full"),   # every weight trains
    ("smollm2", 4, 256, False, "bfloat16", True, "sft"),
    ("smollm2", 8, 512, False, "bfloat16", True, "sft"),
    ("smollm2", 8, 512, True, "bfloat16", True, "sft"),
    ("smollm2", 4, 160, False, "bfloat16", False, "dpo"),     # the demo DPO recipe's shape
]


def cpu_rows(quick: bool, methods: tuple[str, ...] = ("sft", "dpo", "full")) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="appliance-plan-accuracy-"))
    home = root / "home"
    dataset = _memory.workspace(home)
    tok = _memory.tokenizer_dir(root / "tokenizer")
    models = set()
    rows = []
    pairs = _memory.long_pairs(root / "long-pairs", words=1500, train=16)
    for model, mb, seq, ckpt, dtype, packing, method in CPU_RUNS[:2] if quick else CPU_RUNS:
        if method not in methods:
            continue
        if model not in models:
            if model == "smollm2":
                from appliance.models import default_gguf

                _memory.cli(home, "models", "import", str(default_gguf()), "--name", model)
            else:
                src = _memory.random_llama(root / model, tok, hidden=512, intermediate=1536, layers=4, heads=8)
                _memory.cli(home, "models", "import", str(src), "--name", model)
            models.add(model)
        got = _memory.measure(home, model, pairs if method == "dpo" else dataset, mb, seq, ckpt, dtype,
                              packing=packing, method=method)
        plan = _memory.predicted(home, got["recipe"])
        predicted = plan["devices"][0]["estimate"]
        measured = got["summary"]["peak_rss_bytes"]
        rows.append({"model": model, "micro_batch": mb, "seq_len": seq, "grad_ckpt": ckpt, "dtype": dtype,
                     "packing": packing, "method": method,
                     "predicted": predicted, "measured": measured, "error": predicted / measured - 1,
                     "breakdown": plan["devices"][0]["breakdown"]})
        print(f"  {model:<11}{method:<5}{mb:>4}{seq:>6}  {'on ' if ckpt else 'off'}  {'on ' if packing else 'off'}  {dtype:<9}"
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
            predicted = parts["weights"] + shape.other_params * 2  # as stored; training upcasts them to fp32
        else:
            predicted = parts[item["part"]]
        rows.append({"source": item["source"], "predicted": predicted, "published": item["value"],
                     "error": predicted / item["value"] - 1, "micro_batch": k.micro_batch, "seq_len": k.seq_len})
    return rows


def gpu_rows() -> list[dict]:
    """The measured GPU rows, each with the planner's estimate for its shape and knobs today."""
    from appliance import plan

    path = HERE / "gpu_measured.json"
    if not path.is_file():
        return []
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        knobs = plan.Knobs(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["knobs"].items()})
        config = r.get("config") or CONFIGS[r["model"]]
        predicted = sum(plan.estimate(plan.shape_from_config(config, r["model"]), knobs, "cuda").values())
        measured = int((r["peak_reserved_gib"] + r["cuda_context_gib"]) * 2**30)
        rows.append({**r, "predicted": predicted, "measured": measured, "error": predicted / measured - 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two CPU runs instead of five")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--methods", default="sft,dpo,full", help="the CPU rows to run, by method (default: all)")
    args = ap.parse_args()
    print(f"memory planner accuracy, {machine()}")
    print("\n1. CPU, measured here: peak RSS of real QLoRA training runs vs the plan (MiB)")
    print(f"  {'model':<11}{'kind':<5}{'mb':>4}{'seq':>6}  ckpt pack dtype    {'predicted':>9}{'measured':>10}{'error':>9}")
    cpu = cpu_rows(args.quick, tuple(args.methods.split(",")))
    print("\n2. published GPU figures vs the plan")
    pub = published_rows()
    for r in pub:
        print(f"  {r['source'][:96]:<96} {r['predicted'] / 2**30:>6.2f} GiB vs {r['published'] / 2**30:>6.2f}"
              f"  {100 * r['error']:>+6.1f}%")
    print("\n3. GPU, measured on lent GPU machines (bench/gpu_measured.json) vs the plan as it is now (GiB)")
    gpu = gpu_rows()
    if not gpu:
        print("  (none yet: bench/gpu_probe.py on a CUDA machine appends them)")
    for r in gpu:
        print(f"  {r['label'][:62]:<62} {r['predicted'] / 2**30:>6.2f} vs {r['measured'] / 2**30:>6.2f}"
              f"  {100 * r['error']:>+6.1f}%{'' if r['context_measured'] else '  (context estimated)'}")
    for name, rows, band in (("CPU", cpu, 0.15), ("GPU", [r for r in gpu if r["runner"] == "appliance"], 0.10)):
        if rows:
            worst = max(rows, key=lambda r: abs(r["error"]))
            under = min(r["error"] for r in rows)
            print(f"{name}: worst error {100 * worst['error']:+.1f}% (target within +/-{100 * band:.0f}%), "
                  f"most under {100 * min(0, under):+.1f}% (target: never more than 5% under)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "published": pub, "gpu": gpu}, indent=2))


if __name__ == "__main__":
    main()
