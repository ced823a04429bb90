"""Merging: a run's LoRA adapter folded into its base model's 16-bit weights, in bounded memory.

The merge streams (``merge_streaming``): the base's safetensors are read shard by shard and tensor by tensor,
each adapted weight is merged in float32 (``W + scale * B A``, DoRA's norm-scaled form, PEFT's operations in
PEFT's order) and written in the base's saved dtype into new shards with the same names and index; everything
else is cast or copied. Peak memory is a few of the largest tensors plus the adapter, whatever the model's size,
so the 32B and 70B recipes merge on the 128 GB workstation they train on. Never into 4-bit weights (merging onto
NF4 would bake the quantization error into the result).

Checked twice: every merged tensor, read back from disk, against base + adapter on random vectors within what
rounding to the saved dtype explains (``check_weights``, bounded memory, always); and, where the float32 model is
small enough to hold, the old end-to-end check: base+adapter's logits against its float32 merge on held-out
prompts. Both go to ``runs/<id>/merge.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import data, hardware, runs
from .chat_format import render, with_system
from .errors import CheckFailed
from .events import Emit, Event, ignore
from .trust import manifest
from .workspace import fault_point, read_json, staging, write_json

STAGE = "merge"
MAX_ABS_DIFF = 1e-3  # fp32 merge vs unmerged: algebraically equal, so only rounding may differ


def merged_dir(run_id: str) -> Path:
    return runs.run_dir(run_id) / "merged"


def merge(run_id: str, samples: int = 8, emit: Emit = ignore, checkpoint: str = "best") -> dict:
    """Merge the run's adapter at ``checkpoint`` (best, last or a step; see ``runs.adapter``)."""
    from .models import model_dir, saved_dtype
    from .trust import keys

    run = runs.run_dir(run_id)
    source = runs.adapter(run_id, checkpoint)
    adapter = source["path"]
    try:
        manifest.verify(adapter)
    except CheckFailed as e:
        raise CheckFailed(f"the adapter at {source['label']} does not match its signed manifest "
                          f"({str(e).rstrip('.')}); train the run again.") from None
    keys.ensure_signer()  # before the work: the merged model's manifest is signed
    recipe = runs.load_recipe(run_id)
    base = model_dir(recipe.base_model)
    check_base(run, base)
    save_dtype = saved_dtype(base / "config.json")
    from transformers import AutoTokenizer

    full = recipe.lora is None
    final = run / ("full" if full else "adapter")
    tokenizer = AutoTokenizer.from_pretrained(str(final))  # the same tokenizer at every step
    # Full fine-tuning trained the weights themselves: nothing to merge, only the chosen step's weights to save in
    # the base's dtype where export looks for them.
    source_weights = adapter if full else base
    out = merged_dir(run_id)
    emit(Event("stage", STAGE, f"merging the adapter of {source['label']} into {recipe.base_model} shard by shard "
                               f"(float32, saved as {save_dtype})" if not full else
                               f"saving the weights of {source['label']} as {save_dtype}, shard by shard"))
    for stale in run.glob(f".tmp-{out.name}-*"):  # what a merge killed before left: as large as the model
        shutil.rmtree(stale, ignore_errors=True)
    with staging(out, replace=True) as tmp:  # kill -9 at any point: the previous merged model or none, never a mix
        written = merge_streaming(source_weights, None if full else adapter, tmp, save_dtype, emit)
        config = read_json(source_weights / "config.json")
        config["dtype"] = save_dtype
        write_json(tmp / "config.json", config)
        if (source_weights / "generation_config.json").is_file():
            shutil.copyfile(source_weights / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(str(tmp))
        emit(Event("stage", STAGE, "checking every merged weight against base + adapter on random vectors"))
        weights = check_weights(source_weights, None if full else adapter, tmp, save_dtype, emit)
        logits = _logit_check(base, None if full else adapter, tmp, tokenizer, recipe, samples, emit)
        manifest.write(tmp, "merged-model", f"{run_id}/merged",
                       parents={"adapter": source["id"], "base_model": recipe.base_model}, dtype=save_dtype,
                       max_abs_logit_diff=logits["max_abs_logit_diff"], checkpoint=source["name"],
                       step=source["step"], hardware=hardware.summary(), **weights)
    result = {"path": str(out), "dtype": save_dtype, **logits, **weights, "bytes": written["bytes"],
              "files": len(written["files"]), "checkpoint": source["name"], "step": source["step"],
              "label": source["label"]}
    write_json(run / "merge.json", result)
    from .trust import audit

    audit.record("merge", {"run": run_id, "base_model": recipe.base_model},
                 {"dtype": save_dtype, "max_abs_logit_diff": logits["max_abs_logit_diff"],
                  "max_weight_excess": weights["max_weight_excess"], "checkpoint": source["name"]})
    said = (f"max |logit diff| vs base+adapter {logits['max_abs_logit_diff']:.2e}; "
            if logits["max_abs_logit_diff"] is not None else "")
    emit(Event("finished", STAGE, f"merged; {said}every weight within {weights['max_weight_excess']:.2f} of its "
                                  "rounding bound", result))
    return result


# The whole-model logits check (base+adapter against the merged model, both in float32) runs where it is cheap:
# it holds one float32 model in memory. Above this the per-weight check alone decides (it implies the same: the
# model is its weights), and merge stays within a few tensors' memory at any size.
LOGIT_CHECK_MAX_BYTES = 2 << 30  # (plan.LOGIT_CHECK_MAX_BYTES says the same for the footprint)


def _logit_check(base: Path, adapter: Path | None, merged: Path, tokenizer, recipe, samples: int,
                 emit: Emit) -> dict:
    """On held-out prompts, the logits of base+adapter against the float32 merge of the same (PEFT's), as before
    the streaming merge: it checks the algebra end to end, and check_weights checks that the files written hold
    it within the saved dtype's rounding. Skipped (None) for a model whose float32 copy is over
    LOGIT_CHECK_MAX_BYTES."""
    from . import shards

    fp32 = sum(s.nbytes // shards.DTYPES[s.dtype][1] * 4 for n in shards.shard_files(merged)
               for s in shards.specs(merged / n))
    if adapter is None or fp32 > LOGIT_CHECK_MAX_BYTES:
        why = ("full fine-tuning: nothing merged" if adapter is None else
               f"the float32 model is {fp32 / 2**30:.1f} GiB, over {LOGIT_CHECK_MAX_BYTES / 2**30:.0f} GiB: the "
               "per-weight check decides")
        return {"max_abs_logit_diff": 0.0 if adapter is None else None, "logit_check": why, "positions": 0,
                "prompts": 0}
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    emit(Event("stage", STAGE, "checking the merged model's logits against base+adapter on held-out prompts"))
    batch = _heldout_batch(tokenizer, recipe, samples)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                          str(adapter)).eval()
        unmerged = model(**batch).logits[mask]
        after = model.merge_and_unload().eval()(**batch).logits[mask]
    diff = (unmerged - after).abs().max().item()
    if diff > MAX_ABS_DIFF:
        raise CheckFailed(f"the merged model's logits differ from base+adapter by {diff:.3g} (> {MAX_ABS_DIFF}); "
                          "the adapter does not match its base model.")
    return {"max_abs_logit_diff": diff, "logit_check": "float32 logits on held-out prompts",
            "positions": int(mask.sum()), "prompts": batch["input_ids"].shape[0]}


def check_base(run: Path, base: Path) -> None:
    """The base weights are the ones the run was trained on: every file as its signed manifest lists it, and that
    manifest the one the run's manifest bound. (The logit check below compares two models built from the same
    files on disk, so it cannot see a base that changed after training; this does.)"""
    again = "re-import the model the run was trained on, or train again on this one"
    try:
        manifest.verify(base)
    except CheckFailed as e:
        raise CheckFailed(f"the base model {base.name} changed after training ({str(e).rstrip('.')}); {again}.") from None
    run_manifest = manifest.read(run) if (run / manifest.NAME).is_file() else {}
    bound = (run_manifest.get("parent_manifests") or {}).get("base_model")
    if bound is not None and bound != manifest.sha256_file(base / manifest.NAME):
        raise CheckFailed(f"the base model {base.name} is not the one run {run.name} was trained on (its manifest "
                          f"changed: re-imported since?); {again}.")


def _heldout_batch(tokenizer, recipe, samples: int):
    """Held-out conversations rendered with the training template, as one padded batch."""
    texts = [render(tokenizer, with_system(c, recipe.system_prompt)) for c in data.heldout(recipe, samples)]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


# -- the streaming merge: shard by shard, tensor by tensor ---------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def adapter_updates(adapter: Path) -> tuple[dict[str, dict], dict[str, object], dict]:
    """The adapter, read whole (it is small: megabytes next to the model's gigabytes): for each adapted weight of
    the base (``model.layers.0.self_attn.q_proj.weight``), its A, B, scale and DoRA magnitude; the modules saved
    whole (``modules_to_save``), by their weight names; and the adapter's config."""
    import math

    from safetensors.torch import load_file

    from .workspace import read_json

    config = read_json(adapter / "adapter_config.json")
    if config.get("fan_in_fan_out"):
        raise CheckFailed(f"{adapter} was trained with fan_in_fan_out (Conv1D layers); the streaming merge handles "
                          "Linear layers.")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    updates: dict[str, dict] = {}
    whole: dict[str, object] = {}
    for key, tensor in saved.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            if name.endswith("." + part):
                module = name[: -len(part) - 1]
                updates.setdefault(module + ".weight", {})[part.split(".")[0]] = tensor
                break
        else:
            whole[name] = tensor
    for weight, u in updates.items():
        module = weight[: -len(".weight")]
        if "lora_A" not in u or "lora_B" not in u:
            raise CheckFailed(f"{adapter}: {module} has {'lora_A' if 'lora_A' in u else 'lora_B'} without its pair; "
                              "the adapter is damaged.")
        r = _pattern(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        u["scale"] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return updates, whole, config


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: the pattern key that the module's name ends with (as PEFT matches them)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def merged_weight(weight, update: dict):
    """``W + scale * (B @ A)`` in float32, or DoRA's ``m / ||W + scale * B @ A||_row * (W + scale * B @ A)``, with
    PEFT's operations in PEFT's order, so the result equals its ``merge_and_unload`` bit for bit."""
    w = weight.float()
    delta = (update["lora_B"].float() @ update["lora_A"].float()) * update["scale"]
    if "lora_magnitude_vector" not in update:
        return w + delta
    import torch

    norm = torch.linalg.norm(w + delta, dim=1)
    return (update["lora_magnitude_vector"].float() / norm).view(-1, 1) * (w + delta)


def merge_streaming(base: Path, adapter: Path | None, out: Path, save_dtype: str, emit: Emit = ignore) -> dict:
    """Write the merged model's safetensors into the folder ``out``, one base shard and one tensor at a time:
    each adapted weight merged in float32 and cast to ``save_dtype``, every other floating tensor cast, the rest
    copied. ``adapter`` None: a cast alone (full fine-tuning's weights). The index and the shards keep the base's
    names. Returns what was written (files, bytes, tensors merged)."""
    import torch

    from . import shards

    updates, whole, _ = adapter_updates(adapter) if adapter is not None else ({}, {}, {})
    files = shards.shard_files(base)
    target = shards.NAMES[save_dtype]
    weight_map: dict[str, str] = {}
    pending = dict(updates)
    merged = written = 0
    for i, name in enumerate(files, 1):
        source = shards.specs(base / name)
        plan = [shards.Spec(s.name, target if s.dtype in shards.FLOATING else s.dtype, s.shape) for s in source]
        reader = shards.Reader(base, [name])

        def produce(spec):
            nonlocal merged
            tensor = reader.get(spec.name)
            if spec.name in pending:
                tensor = merged_weight(tensor, pending.pop(spec.name))
                merged += 1
                fault_point("merge_mid_shard")  # tests: a kill -9 here leaves the previous merged model whole
            elif spec.name in whole:
                tensor = whole[spec.name]
            return tensor.to(getattr(torch, shards.DTYPES[spec.dtype][0]))

        written += shards.write(out / name, plan, produce)
        weight_map.update({s.name: name for s in source})
        emit(Event("progress", STAGE, f"shard {i} of {len(files)} merged", {"done": i, "total": len(files)}))
    if pending:
        missing = sorted(pending)[0]
        raise CheckFailed(f"the adapter changes {missing}, which {base} does not have; it was trained on another "
                          "model.")
    absent = sorted(set(whole) - set(weight_map))
    if absent:
        raise CheckFailed(f"the adapter saves {absent[0]} whole, which {base} does not have (a tied weight?); the "
                          "streaming merge cannot place it.")
    if len(files) > 1 or (base / shards.INDEX).is_file():
        total = sum((out / n).stat().st_size for n in files)
        write_json(out / shards.INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"files": files, "bytes": written, "merged_tensors": merged}


# Unit roundoff of each saved dtype: a value rounded to it is off by at most this share of itself.
ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
CHECK_VECTORS = 4


def check_weights(base: Path, adapter: Path | None, merged: Path, save_dtype: str, emit: Emit = ignore) -> dict:
    """Every tensor of the merged folder, read back from disk, against base + adapter, in bounded memory:

    - an adapted weight M, on random vectors x: ``M x`` against ``W x + scale * B (A x)`` (DoRA: scaled per row by
      ``m / ||W + scale * B A||``), computed in float32 without forming the merged weight; the difference must stay
      within what rounding to the saved dtype can cause, ``2u |M| |x|`` (u: its unit roundoff) plus float32's own;
    - a weight the adapter saves whole: equal to it; every other tensor: equal to the base's, cast.

    Since the model is these weights, this is the logits check's meaning (merged == base + adapter) taken weight by
    weight: a few tensors in memory at a time, whatever the model's size. Returns the worst excess (1.0: at the
    bound) and the counts; a tensor over its bound stops with its name."""
    import torch

    from . import shards

    updates, whole, _ = adapter_updates(adapter) if adapter is not None else ({}, {}, {})
    u = ROUNDOFF[save_dtype]
    dtype = getattr(torch, save_dtype)
    generator = torch.Generator().manual_seed(0)
    base_reader = shards.Reader(base)
    worst, adapted, copied = 0.0, 0, 0
    files = shards.shard_files(merged)
    for i, name in enumerate(files, 1):
        reader = shards.Reader(merged, [name])
        for tensor_name in reader.names():
            if tensor_name not in base_reader:
                raise CheckFailed(f"the merged model holds {tensor_name}, which the base does not.")
            m, w = reader.get(tensor_name), base_reader.get(tensor_name)
            if tensor_name in updates:
                excess = _excess(m, w, updates[tensor_name], u, generator)
                worst = max(worst, excess)
                adapted += 1
                if not excess <= 1.0:
                    raise CheckFailed(f"the merged {tensor_name} is not base + adapter: on random vectors it is off by "
                                      f"{excess:.1f} times what rounding to {save_dtype} can explain.")
            else:
                expected = whole[tensor_name] if tensor_name in whole else w
                if not torch.equal(m, expected.to(dtype) if m.is_floating_point() else expected):
                    raise CheckFailed(f"the merged {tensor_name} is not the "
                                      f"{'adapter' if tensor_name in whole else 'base'}'s, cast to {save_dtype}.")
                copied += 1
            del m, w
        emit(Event("progress", STAGE, f"checked shard {i} of {len(files)}", {"done": i, "total": len(files),
                                                                             "check": True}))
    if adapted != len(updates):
        raise CheckFailed(f"the merged model holds {adapted} of the adapter's {len(updates)} adapted weights.")
    return {"weights_checked": adapted, "tensors_copied": copied, "max_weight_excess": worst,
            "vectors": CHECK_VECTORS}


def _excess(m, w, update: dict, u: float, generator) -> float:
    """How far ``m x`` is from base + adapter on random vectors, as a share of what rounding can explain (1.0: the
    limit). Two tests, the stricter counts: no component beyond the worst case of rounding every weight the wrong
    way (``2u |M| |x|``), and the mean square of the difference within twice the standard deviation that rounding
    to nearest gives (each weight off by at most ``u |M|``, uniformly: variance ``u^2 M^2 / 3``). The second is the
    sharp one: a whole tensor 1% off in bfloat16 stays under the worst case of each component, yet its squares add
    up to about five times the rounding's."""
    import torch

    eps = 2.0 ** -24
    x = torch.randn(w.shape[1], CHECK_VECTORS, generator=generator)
    wf, a, b, s = w.float(), update["lora_A"].float(), update["lora_B"].float(), update["scale"]
    ref = wf @ x + s * (b @ (a @ x))
    noise = wf.abs() @ x.abs() + abs(s) * (b.abs() @ (a.abs() @ x.abs()))
    if "lora_magnitude_vector" in update:
        factor = update["lora_magnitude_vector"].float() / torch.linalg.norm(wf + (b @ a) * s, dim=1)
        ref, noise = factor.view(-1, 1) * ref, factor.abs().view(-1, 1) * noise
    mf = m.float()
    diff = mf @ x - ref
    worst = 2 * u * (mf.abs() @ x.abs()) + 64 * eps * noise + 1e-30
    variance = (u * u / 3) * ((mf * mf) @ (x * x)) + (64 * eps * noise) ** 2 + 1e-30
    spread = ((diff * diff).mean() / variance.mean()).sqrt().item() / 2
    return max((diff.abs() / worst).max().item(), spread)
