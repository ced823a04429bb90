"""Packed micro-batches: the same loss as padded ones, and attention that never crosses documents.

The real pieces: TRL's best-fit-decreasing packing and padding-free collator, transformers' Llama, and our
per-document attention (appliance/train/attention.py) registered in transformers' AttentionInterface.
"""

from __future__ import annotations


import torch  # noqa: E402


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.train import attention

    attention.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def _examples(n: int = 9):
    """Conversations of mixed lengths with the loss on the answer only (labels -100 on the prompt)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 60, (1,), generator=g))
        ids = torch.randint(3, 211, (length,), generator=g).tolist()
        prompt = length // 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _padded(rows):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0)(rows)


def _packed(rows, max_length=96):
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    packed = pack_dataset(Dataset.from_list(rows), max_length, "bfd")
    assert len(packed) < len(rows), "the examples should share bins"
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(packed))


@torch.no_grad()
def test_packed_loss_equals_padded_loss():
    from appliance.train import attention

    rows = _examples()
    padded = _padded(rows)
    packed = _packed(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)  # no padding at all
    reference = _model("sdpa")(**padded).loss
    ours = _model(attention.NAME)(**packed).loss
    assert abs(ours.item() - reference.item()) < 1e-3, (ours.item(), reference.item())
    # transformers' own block-diagonal mask agrees too (what ours replaces, not what it changes); it finds the
    # documents only without a cache, while ours reads the collator's boundaries
    assert abs(_model("sdpa")(**packed, use_cache=False).loss.item() - reference.item()) < 1e-3


@torch.no_grad()
def test_packed_attention_does_not_cross_documents():
    """Each document's logits equal those of the document alone; negative control: the same row attended as
    one causal sequence does not."""
    from appliance.train import attention

    rows = _examples()
    packed = _packed(rows)
    model = _model(attention.NAME)
    crossing = {k: v for k, v in packed.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    crossing["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    logits, crossed = model(**packed).logits[0], model(**crossing).logits[0]
    starts = packed["cu_seq_lens_q"].tolist()
    for i, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
        alone = model(input_ids=packed["input_ids"][:, s:e]).logits[0]
        assert torch.allclose(logits[s:e], alone, atol=1e-4)
        if i > 0:  # every later document would see the ones before it
            assert (crossed[s:e] - alone).abs().max() > 1e-3


def test_packed_gradients_match_padded():
    """The backward pass agrees too: what training actually uses."""
    from appliance.train import attention

    rows = _examples()
    grads = []
    for attn, batch in (("sdpa", _padded(rows)), (attention.NAME, _packed(rows))):
        model = _model(attn)
        model(**batch).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_the_cpu_native_loss_equals_trls_fused_loss(tiny_model_dir, demo_dataset, tmp_path):
    """On a CPU the worker computes the loss from the model's own logits (appliance.train.trainer.trainer_class);
    on CUDA it keeps TRL's chunked head. Same batch, same model: the same loss (and, with the head in bf16, within
    bf16's rounding)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from appliance import data
    from appliance.chat_format import encode
    from appliance.train.model import low_precision_head
    from appliance.train.trainer import trainer_class

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.pad_token = tok.unk_token or tok.bos_token
    rows = [encode(tok, r["messages"], 96) for r in data.load_split(demo_dataset, "train")[:12]]
    ds = datasets.Dataset.from_list(rows)
    losses = {}
    for name, cuda, head in (("native", False, None), ("fused", True, None), ("bf16", False, torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                     attn_implementation=attention_name())
        if head is not None:
            model.lm_head = low_precision_head(model.lm_head, head)
        args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_length=96, packing=True,
                         packing_strategy="bfd", report_to=[], use_cpu=True, disable_tqdm=True, seed=1)
        trainer = trainer_class(cuda)(model=model, args=args, train_dataset=ds, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        with torch.no_grad():
            losses[name] = trainer.compute_loss(model, dict(batch)).item()
    assert abs(losses["native"] - losses["fused"]) < 1e-4, losses
    assert abs(losses["bf16"] - losses["native"]) < 2e-2 * losses["native"], losses
    assert trainer._metrics["train"]["num_tokens"][0] == batch["input_ids"].numel()  # what tokens/s is made of


def attention_name():
    from appliance.train import attention

    return attention.register()


def test_train_with_auto_knobs_packed_and_unpacked(tiny_home, tmp_path, demo_dataset):
    """`appliance train` on a recipe that leaves the micro-batch and checkpointing to the plan: the run's recipe holds
    what the plan chose (the effective batch kept), the first event says how the step is made, and a run with
    packing off trains too."""
    import json

    from conftest import cli_json, run_events, write_recipe

    home = tiny_home
    recipe = write_recipe(tmp_path / "auto.yaml", demo_dataset, max_steps=2, save_steps=100, eval_steps=100,
                          micro_batch_size="auto", batch_size=4, gradient_checkpointing="auto")
    st = cli_json("train", str(recipe), home=home)
    assert st["state"] == "finished", st
    run = home / "runs" / st["id"]
    kept = json.loads((run / "recipe.json").read_text())["training"]
    assert kept["micro_batch_size"] == 4 and kept["gradient_accumulation_steps"] == 1 and kept["batch_size"] == 4
    assert kept["gradient_checkpointing"] is False and kept["packing"] is True
    chosen = json.loads((run / "plan.json").read_text())["choices"]
    assert [c["change"] for c in chosen] == ["gradient checkpointing off", "micro-batch 4 x gradient accumulation 1"]
    how = next(e for e in run_events(home, st["id"]) if e.type == "stage" and "attention" in e.data)
    assert how.data["attention"] == "appliance_documents" and how.data["packing"] is True
    assert how.data["kernels"] is None  # no CUDA here: transformers' own layers
    assert "loss native" in how.message

    plain = write_recipe(tmp_path / "unpacked.yaml", demo_dataset, max_steps=2, save_steps=100, eval_steps=100,
                         packing=False)
    st = cli_json("train", str(plain), home=home)
    assert st["state"] == "finished", st
    how = next(e for e in run_events(home, st["id"]) if e.type == "stage" and "attention" in e.data)
    assert how.data["attention"] == "sdpa" and how.data["packing"] is False
