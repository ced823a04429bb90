"""Attention that never crosses documents, without an L x L mask.

Packed (padding-free) micro-batches are one row of several documents, described by TRL's collator as
``position_ids`` restarting at 0 and ``cu_seq_lens_q`` (each document's start). transformers turns packed
``position_ids`` into a dense block-diagonal mask for SDPA, which is correct but slower than plain causal
attention, and on a CPU forces SDPA's math path (scores and probabilities kept for the backward pass). Here
each document gets its own causal SDPA call instead (flash-style kernels, nothing quadratic kept), and a
padded batch (packing off, or evaluation) keeps transformers' own SDPA path and mask.

Measured on this machine's CPU (SmolLM2-135M, QLoRA, 8 x 160-token bins): see bench/train_throughput.py.

``choose(cuda, packing)`` names the attention the trainer loads the model with: flash-attention 2 on CUDA where
the ``flash_attn`` package is installed (it reads the same boundaries), else this one when packing, else SDPA.
``apply_kernels`` swaps in Liger's fused RMSNorm, RoPE and SwiGLU on CUDA (``training.kernels: auto``).

``register()`` adds the implementation to transformers' ``AttentionInterface`` (and its mask function to
``AttentionMaskInterface``) and returns its name for ``attn_implementation``.
"""

from __future__ import annotations

NAME = "appliance_documents"


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA per document of a packed row (``cu_seq_lens_q`` given, no mask), else transformers' SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if starts is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = starts.tolist()  # one host sync a layer; the collator builds it on the CPU
    if len(bounds) <= 2:  # one document: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    pieces = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout,
                                     scaling, **kwargs)[0]
              for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(pieces, dim=1), None


def document_mask(*args, attention_mask=None, **kwargs):
    """No mask without padding (a packed row is split by the attention, by ``cu_seq_lens_q``); transformers' SDPA
    mask for a padded batch."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, document_attention)
    AttentionMaskInterface.register(NAME, document_mask)
    return NAME


def choose(cuda: bool, packing: bool) -> str:
    import importlib.util

    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register() if packing else "sdpa"


def apply_kernels(model, kernels: str, cuda: bool) -> str | None:
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU, in place, where they can run: on CUDA, with
    ``liger-kernel`` installed, for an architecture Liger knows. The LM head and loss stay TRL's (its chunked head
    already never materializes the logits). Returns what was applied, or None."""
    import importlib.util

    if kernels == "none" or not cuda or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    except (ValueError, NotImplementedError, TypeError) as e:  # an architecture Liger has no kernels for
        return f"none ({str(e)[:80]})"
    return "liger (RMSNorm, RoPE, SwiGLU)"
