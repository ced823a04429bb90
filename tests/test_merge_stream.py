"""The streaming merge (issue 27): shard by shard, tensor by tensor, equal to PEFT's merge_and_unload in the saved
dtype for every tensor, LoRA and DoRA, rsLoRA and per-module ranks, one file or several shards; a weight the
base lacks is refused."""

from __future__ import annotations

import json

import pytest
import torch

from appliance import merge, shards
from appliance.errors import CheckFailed


def _adapter(base_dir, out, **config):
    """A PEFT adapter on the tiny base with random A, B (and DoRA magnitudes), as training leaves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                            task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft.save_pretrained(str(out))
    return out


def _peft_merged(base_dir, adapter, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.to(dtype) for k, v in merged.state_dict().items()}


def _ours(folder):
    out = {}
    for name in shards.shard_files(folder):
        out.update(dict(shards.tensors(folder / name)))
    return out


@pytest.mark.parametrize("config", [{}, {"use_dora": True}, {"use_rslora": True},
                                    {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 4}}],
                         ids=["lora", "dora", "rslora", "patterns"])
def test_every_tensor_equals_pefts_merge_in_the_saved_dtype(tiny_model_dir, tmp_path, config):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", **config)
    out = tmp_path / "merged"
    out.mkdir()
    done = merge.merge_streaming(tiny_model_dir, adapter, out, "bfloat16")
    ours, theirs = _ours(out), _peft_merged(tiny_model_dir, adapter, torch.bfloat16)
    assert done["merged_tensors"] == 14  # 7 linear layers x 2 blocks
    assert set(ours) <= set(theirs) and len(ours) >= len(theirs) - 1  # (lm_head: tied to the embeddings)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, theirs[name]), name
    base = _ours(tiny_model_dir)
    changed = [n for n in ours if not torch.equal(ours[n], base[n].to(torch.bfloat16))]
    assert len(changed) == 14  # the adapter did change the weights (else equality would prove nothing)


def test_a_sharded_base_stays_sharded_with_its_index(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(str(sharded), max_shard_size="2MB")
    files = shards.shard_files(sharded)
    assert len(files) > 1
    adapter = _adapter(sharded, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    merge.merge_streaming(sharded, adapter, out, "float16")
    assert shards.shard_files(out) == files
    index = json.loads((out / shards.INDEX).read_text())
    assert index["weight_map"] == json.loads((sharded / shards.INDEX).read_text())["weight_map"]
    theirs = _peft_merged(sharded, adapter, torch.float16)
    for name, tensor in _ours(out).items():
        assert torch.equal(tensor, theirs[name]), name
    from transformers import AutoModelForCausalLM as Auto  # the folder loads as a model (with config beside)

    (out / "config.json").write_text((sharded / "config.json").read_text())
    assert Auto.from_pretrained(str(out)).config.num_hidden_layers == 2


def test_an_adapter_for_another_model_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 128)
    weights["base_model.model.model.layers.7.mlp.up_proj.lora_B.weight"] = torch.zeros(256, 4)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(CheckFailed, match="model.layers.7.mlp.up_proj.weight, which .* does not have"):
        merge.merge_streaming(tiny_model_dir, adapter, out, "bfloat16")


def test_the_writer_refuses_a_tensor_that_is_not_its_header(tmp_path):
    spec = shards.Spec("w", "BF16", (2, 2))
    with pytest.raises(ValueError, match="the header says"):
        shards.write(tmp_path / "x.safetensors", [spec], lambda s: torch.zeros(2, 3, dtype=torch.bfloat16))
    shards.write(tmp_path / "y.safetensors", [spec], lambda s: torch.ones(2, 2, dtype=torch.bfloat16))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["w"], torch.ones(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("config", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_the_weight_check_passes_the_merge_and_fails_one_dropped_or_corrupted_tensor(tiny_model_dir, tmp_path,
                                                                                     config):
    from safetensors.torch import load_file, save_file

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", **config)
    out = tmp_path / "merged"
    out.mkdir()
    merge.merge_streaming(tiny_model_dir, adapter, out, "bfloat16")
    checked = merge.check_weights(tiny_model_dir, adapter, out, "bfloat16")
    assert checked["weights_checked"] == 14 and checked["max_weight_excess"] <= 1.0
    assert checked["tensors_copied"] > 0

    good = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    for broken, words in ((base[name].to(torch.bfloat16), f"the merged {name} is not base \\+ adapter"),  # dropped
                          (good[name] * 1.01, f"the merged {name} is not base \\+ adapter"),  # 1% off
                          ):
        save_file({**good, name: broken.contiguous()}, str(out / "model.safetensors"))
        with pytest.raises(CheckFailed, match=words):
            merge.check_weights(tiny_model_dir, adapter, out, "bfloat16")
    other = "model.layers.0.input_layernorm.weight"  # a weight the adapter does not touch, changed
    save_file({**good, other: (good[other] + 1).contiguous()}, str(out / "model.safetensors"))
    with pytest.raises(CheckFailed, match=f"the merged {other} is not the base's"):
        merge.check_weights(tiny_model_dir, adapter, out, "bfloat16")


def test_the_layer_by_layer_reference_equals_the_whole_model(tiny_model_dir, tmp_path):
    """The export's reference for models too large to hold: the same logits as the model loaded whole, on a
    padded batch, with the tiny model saved in bfloat16 and read back layer by layer."""
    from transformers import AutoModelForCausalLM

    from appliance import layerwise

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).to(torch.bfloat16).save_pretrained(
        str(folder), max_shard_size="2MB")
    ids = torch.tensor([[1, 5, 9, 200, 7, 3], [1, 8, 2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    whole = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        expected = whole(input_ids=ids, attention_mask=mask).logits
    got = layerwise.logits(folder, ids, mask)
    assert (got - expected)[mask.bool()].abs().max().item() < 1e-5


def test_export_stops_before_a_step_that_would_fill_the_disk(exported_home, monkeypatch):
    """Free space is checked before each step (the disk's capacity is the boundary faked here): one sentence
    naming the step, the bytes needed and free; the previous GGUF files stay, nothing half-written is left."""
    import shutil

    from appliance import export
    from appliance.errors import StageFailed

    home, run_id = exported_home
    gguf = home / "runs" / run_id / "gguf"
    before = sorted(p.name for p in gguf.iterdir())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(StageFailed, match=r"converting the merged model to an f16 GGUF needs about 0\.\d GiB and "
                                          r"0\.0 GiB are free at .*; free space there"):
        export.export(run_id, ["q8_0"])
    assert sorted(p.name for p in gguf.iterdir()) == before
    assert not list(gguf.parent.glob(".tmp-gguf-*"))
