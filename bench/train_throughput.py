"""Training throughput: `appliance train` vs a plain transformers + PEFT + bitsandbytes loop.

Same model (SmolLM2-135M-Instruct, NF4 double-quant base, LoRA r=16 on all linear layers, fp32 adapters),
same tokenized demo data with the loss on assistant tokens, same micro-batch, learning rate and threads.
Figure: non-padding tokens per second over the steps after warm-up (the first steps pay one-off costs).
"""

from __future__ import annotations

import statistics
import time

from _common import machine, scratch_workspace

STEPS, WARMUP = 12, 2


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
    return {"tokens_per_s": statistics.mean(rates), "wall_s": wall, "final_loss": st["summary"]["final_loss"]}


def plain(recipe) -> dict:
    """What a user would write by hand: load, quantize, wrap, loop."""
    import os

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from appliance import data
    from appliance.chat_format import encode
    from appliance.models import model_dir

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    base = model_dir(recipe.base_model)
    tok = AutoTokenizer.from_pretrained(str(base))
    t = recipe.training
    rows = [encode(tok, r["messages"], t.max_seq_length) for r in data.load_split(recipe.dataset_path(), "train")]
    dtype = getattr(torch, recipe.quantization.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                             lora_dropout=recipe.lora.dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode; the Trainer trains with LoRA dropout on, so must this
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate)
    pad = tok.convert_tokens_to_ids(tok.unk_token)
    rates = []
    b = t.micro_batch_size
    for step in range(STEPS):
        batch = rows[step * b:(step + 1) * b]
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in batch])
        att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([[i if m else -100 for i, m in zip(r["input_ids"], r["assistant_masks"])]
                               + [-100] * (n - len(r["input_ids"])) for r in batch])
        s = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
        opt.step()
        opt.zero_grad()
        if step >= WARMUP:
            rates.append(int(att.sum()) / (time.perf_counter() - s))
    return {"tokens_per_s": statistics.mean(rates), "wall_s": time.perf_counter() - t0, "final_loss": loss.item()}


def main() -> None:
    scratch_workspace()
    from appliance import demo, recipes

    recipe = recipes.load(demo.recipe_path(), **{"training.max_steps": STEPS, "training.save_steps": 1000,
                                                 "training.eval_steps": 1000, "dataset": demo.DATASET_ID})
    a = ours(recipe)
    b = plain(recipe)
    print(f"training throughput, SmolLM2-135M QLoRA, micro-batch {recipe.training.micro_batch_size}, "
          f"{recipe.quantization.compute_dtype}, {STEPS} steps ({WARMUP} warm-up), {machine()}")
    print(f"{'':28}{'non-pad tokens/s':>18}{'wall s':>10}")
    print(f"{'appliance train':28}{a['tokens_per_s']:>18.1f}{a['wall_s']:>10.1f}")
    print(f"{'plain transformers+PEFT':28}{b['tokens_per_s']:>18.1f}{b['wall_s']:>10.1f}")
    print(f"ratio (appliance / plain): {a['tokens_per_s'] / b['tokens_per_s']:.2f}")
    print("wall s: appliance includes the child process start, tokenization, TRL's set-up, checkpoint-free "
          "steps and saving the adapter; plain includes model load and its steps.")


if __name__ == "__main__":
    main()
