"""Packed micro-batches: the same loss as padded ones, and attention that never crosses documents.

The real pieces: TRL's best-fit-decreasing packing and padding-free collator, transformers' Llama, and our
per-document attention (appliance/train/attention.py) registered in transformers' AttentionInterface.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


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
