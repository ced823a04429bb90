"""A Hugging Face causal LM run in float32 one decoder layer at a time, straight from its safetensors: the
reference logits of a model too large to hold, in a few layers' worth of memory.

The model is built on the meta device (no memory), the small parts (embeddings, final norm, head, rotary tables)
are loaded in float32, and each decoder layer is wrapped so that its weights are read from disk (``shards.Reader``:
no mapping left resident) just before its forward and dropped after. transformers' own forward runs unchanged
(masks, rotary embeddings, the architecture's details), so the logits equal the whole model's (tested on the tiny
model). Every conversation goes through in one padded batch, so each layer is read once.

Works for the decoder-only models the appliance imports (``model.layers``: Llama, Qwen2, Mistral, Gemma, ...).
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidInput


def _load(module, prefix: str, reader) -> None:
    """Give ``module`` (on the meta device) its weights from ``reader``, in float32."""
    import torch

    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            key = prefix + name
            if key in reader:
                tensor.copy_(reader.get(key).to(tensor.dtype))


def _streamed(layer, prefix: str, reader):
    import torch

    class Streamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def __getattr__(self, name):  # attributes transformers reads from a layer (attention_type, ...)
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["inner"], name)

        def forward(self, *args, **kwargs):
            _load(self.inner, prefix, reader)
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.inner.to("meta")  # its memory goes back now

    return Streamed()


def logits(folder: Path, input_ids, attention_mask):
    """The model's float32 logits for a padded batch, [batch, length, vocabulary]."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import shards

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise InvalidInput(f"{folder}: a {type(model).__name__} has no model.layers; the layer-by-layer reference "
                           "runs decoder-only models (Llama, Qwen2, Mistral, Gemma).")
    reader = shards.Reader(folder)
    for name, module in inner.named_children():
        if name == "layers":
            continue
        if name == "rotary_emb":  # its tables are computed at construction, not stored: build it again on the CPU
            with torch.device("cpu"):
                inner.rotary_emb = type(module)(config=config)
            continue
        _load(module, f"model.{name}.", reader)
    head = model.get_output_embeddings()
    if config.tie_word_embeddings or "lm_head.weight" not in reader:
        head.weight = model.get_input_embeddings().weight
    else:
        _load(head, "lm_head.", reader)
    for i, layer in enumerate(inner.layers):
        inner.layers[i] = _streamed(layer, f"model.layers.{i}.", reader)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
