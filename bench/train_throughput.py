"""Training throughput: `appliance train` vs a plain transformers + PEFT + bitsandbytes loop, side by side.

Same model (SmolLM2-135M-Instruct by default: NF4 double-quant base, LoRA r=16 on all linear layers, fp32 adapters),
same conversations with the loss on the assistant's tokens, same micro-batch, learning rate, optimizer and threads.

Two datasets:
- ``mix`` (default): conversations whose lengths follow a chat export's long tail: lognormal, median 190 tokens,
  mean ~290, 10% over 600 (the shape of public chat exports such as OpenAssistant's: many short turns, a few long
  ones), cut at ``max_seq_length`` 512. The plain loop pads each micro-batch to its longest example (what a user
  writes with a padding collator); `appliance train` packs examples into bins of 512, padding-free.
- ``demo``: the demo's records (~100 tokens each, nearly equal): what packing cannot help with.

Figures: non-padding tokens per second over the steps after warm-up, and each side's peak memory (peak RSS of its
own process on a CPU; torch.cuda.max_memory_reserved on CUDA). Each side runs in its own process.

    .venv/bin/python bench/train_throughput.py [--data mix|demo] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, scratch_workspace

WARMUP = 2
WORDS = ("the invoice for march was paid late because the supplier changed its bank details and the audit team asked "
         "for a confirmation letter before releasing funds to the new account next quarter review shows margin "
         "pressure in the northern region where delivery costs rose after the contract renewal").split()


def mix_dataset(folder: Path, n: int = 400, max_tokens: int = 512) -> Path:
    """Conversations with a chat export's length distribution (seeded; ~1.3 tokens a word with SmolLM2's BPE)."""
    import random

    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                tokens = min(max_tokens, int(rng.lognormvariate(5.25, 0.8)))
                words = max(4, int(tokens / 1.3))
                question = " ".join(rng.choice(WORDS) for _ in range(max(3, words // 5)))
                answer = " ".join(rng.choice(WORDS) for _ in range(max(2, words - words // 5)))
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return folder


def ours(recipe) -> dict:
    from appliance import runs

    run_id = runs.create(recipe)
    t0 = time.perf_counter()
    runs.start(run_id)
    rates = [e.data["tokens_per_s"] for e in runs.follow(run_id)
             if e.type == "progress" and e.data.get("step", 0) > WARMUP and "tokens_per_s" in e.data]
    wall = time.perf_counter() - t0
    st = runs.status(run_id)
    assert st["state"] == "finished", st
    s = st["summary"]
    return {"tokens_per_s": statistics.mean(rates), "wall_s": wall, "final_loss": s["final_loss"],
            "peak_bytes": s.get("peak_cuda_reserved_bytes") or s["peak_rss_bytes"]}


def plain(recipe_file: str, steps: int) -> dict:
    """What a user writes by hand: load, quantize, wrap, pad each micro-batch to its longest, loop."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from appliance import data, recipes
    from appliance.chat_format import encode
    from appliance.models import model_dir

    recipe = recipes.load(recipe_file)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.set_num_threads(recipe.training.threads or os.cpu_count())
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    base = model_dir(recipe.base_model)
    tok = AutoTokenizer.from_pretrained(str(base))
    t = recipe.training
    rows = [encode(tok, r["messages"], t.max_seq_length) for r in data.load_split(recipe.dataset_path(), "train")]
    dtype = getattr(torch, recipe.quantization.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map={"": device},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing is True)
    model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                             lora_dropout=recipe.lora.dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode; the Trainer trains with LoRA dropout on, so must this
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=t.learning_rate)
    else:
        opt = torch.optim.AdamW(params, lr=t.learning_rate)
    pad = tok.convert_tokens_to_ids(tok.unk_token)
    rates = []
    b = t.micro_batch_size
    for step in range(steps):
        batch = rows[step * b:(step + 1) * b]
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in batch], device=device)
        att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch], device=device)
        labels = torch.tensor([[i if m else -100 for i, m in zip(r["input_ids"], r["assistant_masks"])]
                               + [-100] * (n - len(r["input_ids"])) for r in batch], device=device)
        s = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if step >= WARMUP:
            rates.append(int(att.sum()) / (time.perf_counter() - s))
    peak = torch.cuda.max_memory_reserved() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": statistics.mean(rates), "wall_s": time.perf_counter() - t0, "final_loss": loss.item(),
            "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("mix", "demo"), default="mix")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="auto", help="compute dtype(s), comma-separated: auto (the plan's choice for "
                    "this CPU), float32, bfloat16; e.g. float32,bfloat16 to compare both on this machine")
    ap.add_argument("--plain", help=argparse.SUPPRESS)  # internal: run the plain loop on this recipe, print JSON
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain(args.plain, args.steps)))
        return
    home = scratch_workspace()
    from appliance import demo, plan, recipes

    overrides = {"training.max_steps": args.steps, "training.save_steps": 1000, "training.eval_steps": 1000,
                 "dataset": demo.DATASET_ID}
    if args.data == "mix":
        overrides |= {"dataset": str(mix_dataset(home / "length-mix")), "training.max_seq_length": 512,
                      "training.micro_batch_size": 4}
    rows = []
    for dtype in args.dtype.split(","):
        recipe = recipes.load(demo.recipe_path(), **overrides, **{"quantization.compute_dtype": dtype.strip()})
        # what `appliance train` runs: the plan's choices for the auto knobs (and the dtype); both sides
        recipe, planned = plan.fitted(recipe)
        recipe_file = home / "bench-recipe.yaml"
        import yaml

        recipe_file.write_text(yaml.safe_dump({**recipe.model_dump(mode="json")}))
        a = ours(recipe)
        done = subprocess.run([sys.executable, __file__, "--plain", str(recipe_file), "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "APPLIANCE_HOME": str(home)})
        if done.returncode != 0:
            raise SystemExit(f"the plain loop failed: {done.stderr[-2000:]}")
        b = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((recipe, planned["duration"], a, b))
    t = rows[0][0].training
    print(f"training throughput, SmolLM2-135M QLoRA, data {args.data}, micro-batch {t.micro_batch_size}, "
          f"max_seq_length {t.max_seq_length}, {args.steps} steps ({WARMUP} warm-up)")
    print(f"machine: {machine()}")
    print(f"{'':28}{'dtype':>10}{'non-pad tokens/s':>18}{'plan said':>11}{'peak GiB':>10}{'wall s':>9}")
    for recipe, planned, a, b in rows:
        dtype = recipe.quantization.compute_dtype
        said = f"{planned['tokens_per_s']:,}" + ("" if planned.get("measured") else "*")
        for label, r, estimate in (("appliance train", a, said), ("plain transformers+PEFT", b, "")):
            print(f"{label:28}{dtype:>10}{r['tokens_per_s']:>18.1f}{estimate:>11}{r['peak_bytes'] / 2**30:>10.2f}"
                  f"{r['wall_s']:>9.1f}")
        print(f"  ratio (appliance / plain), {dtype}: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, peak "
              f"memory {a['peak_bytes'] / b['peak_bytes']:.2f}x; the plan's estimate / measured: "
              f"{planned['tokens_per_s'] / a['tokens_per_s']:.2f}")
    print("plan said: the plan's tokens/s before the run, from its probe of this machine (* from the table's rates: "
          "not probed); the run counts non-padding tokens, the plan packed bins' tokens.")
    print("wall s: appliance includes the child process start, tokenization, packing, TRL's set-up and saving the "
          "adapter; plain includes model load and its steps.")


if __name__ == "__main__":
    main()
