"""The model a run trains, built from a recipe: the base loaded (NF4 for QLoRA, else 16-bit, fp32 master weights for
full fine-tuning), the attention and kernels chosen, the adapter wrapped around it, and on a CPU the frozen LM head
kept in the compute dtype.

One builder for the trainer and for the throughput probe (``probe.py``), so the probe times the kernels a run will
really use. It imports no other stage (the probe runs under the planner, which the trainer's run bookkeeping uses).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import attention


def build(base: Path, recipe, dtype: str, cuda: bool, *, fsdp: bool = False, split: dict | None = None,
          packing: bool = False, adapter: Path | None = None, **config) -> tuple[object, dict]:
    """(the model ready to train, what was chosen: {"attention", "kernels"}).

    ``dtype``: the compute dtype's name, resolved (never "auto"). ``split``: {gpu: bytes} to place the layers over
    several GPUs. ``adapter``: an adapter to train on (DPO from an SFT run) instead of a new one. ``config``:
    overrides of the model's config (the probe's ``num_hidden_layers``)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t = recipe.training
    full = recipe.lora is None
    compute_dtype = getattr(torch, dtype)
    # Full fine-tuning keeps fp32 master weights (16-bit weights would round away most updates), computing in
    # the compute dtype under autocast on a GPU.
    load_kwargs: dict = {"dtype": torch.float32 if full else compute_dtype, **config}
    if recipe.quantization.method == "nf4":
        # Under FSDP the packed 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage), so that FSDP
        # shards them as it shards every other tensor of a layer (uint8 storage would stand apart).
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute_dtype, **({"bnb_4bit_quant_storage": compute_dtype} if fsdp else {}))
        load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if cuda else "cpu"}
    if fsdp and cuda:
        # No whole model on any GPU: the first process loads it into host memory, the others on the meta device,
        # and accelerate shards it onto the GPUs (what `accelerate launch` sets for an FSDP config; transformers
        # reads these while loading).
        load_kwargs.pop("device_map", None)
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    if split:
        # The plan found that one replica does not fit a GPU: its layers go over several GPUs, each filled up to
        # the plan's per-GPU limit (accelerate places them; the GPUs then run one after the other).
        load_kwargs["device_map"] = "auto"
        load_kwargs["max_memory"] = split
    load_kwargs["attn_implementation"] = attention.choose(cuda, packing)
    model = AutoModelForCausalLM.from_pretrained(str(base), **load_kwargs)
    kernels = attention.apply_kernels(model, t.kernels, cuda)
    if recipe.quantization.method == "nf4" and not fsdp:
        # (Not under FSDP: its fp32 upcast of the embeddings, norms and head would mix dtypes within a shard; the
        # frozen weights stay in the compute dtype, and the Trainer enables input gradients for checkpointing.)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    dpo = recipe.method == "dpo"
    if full:
        pass  # every weight trains
    elif adapter is not None:
        # The SFT run's adapter trains on; TRL keeps a frozen copy of it as the reference ("ref" adapter): the
        # reference is the SFT model, with no second copy of the base in memory.
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=recipe.lora.target_modules, use_dora=recipe.lora.use_dora, task_type="CAUSAL_LM"))
    if not cuda and compute_dtype != torch.float32 and not (full or dpo or fsdp):
        base_model = model.get_base_model()
        base_model.lm_head = low_precision_head(base_model.lm_head, compute_dtype)
    return model, {"attention": load_kwargs["attn_implementation"], "kernels": kernels}


def low_precision_head(head, dtype):
    """The frozen LM head in the compute dtype on a CPU (prepare_model_for_kbit_training made it fp32).

    SmolLM2-135M, 2048 tokens x 49,152 vocabulary, 2 cores with AVX512-BF16: forward, cross-entropy and backward
    take 1.60 s a step in fp32 and 0.56 s in bf16, a fifth of the whole step. The weight is shared (tied to the
    embeddings, and never trained), so nothing is copied or saved differently."""
    import torch

    class _Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = head

        @property
        def weight(self):
            return self.inner.weight

        def forward(self, hidden):
            return torch.nn.functional.linear(hidden.to(dtype), self.inner.weight.to(dtype))

    return _Head()
