"""Merging: a run's LoRA adapter folded into its base model's 16-bit weights.

The adapter is merged into the base model loaded at full precision from its
safetensors, never into 4-bit weights (merging onto NF4 would bake the
quantization error into the result). The merge is checked: on held-out
prompts the merged model's logits must equal those of base+adapter; the
largest difference is recorded in ``runs/<id>/merge.json``.
"""

from __future__ import annotations

from pathlib import Path

from . import data, hardware, runs
from .chat_format import render, with_system
from .errors import CheckFailed
from .events import Emit, Event, ignore
from .trust import manifest
from .workspace import staging, write_json

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
    emit(Event("stage", STAGE, f"merging the adapter of {source['label']} into {recipe.base_model} (float32, "
                               f"saved as {save_dtype})"))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / ("full" if recipe.lora is None else "adapter")
    tokenizer = AutoTokenizer.from_pretrained(str(final))  # the same tokenizer at every step
    batch = _heldout_batch(tokenizer, recipe, samples)
    mask = batch["attention_mask"].bool()
    if recipe.lora is None:
        # Full fine-tuning trained the weights themselves: nothing to merge, only the chosen step's weights to
        # save in the base's dtype where export looks for them.
        merged = AutoModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
        diff = 0.0
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            unmerged = model(**batch).logits
            merged = model.merge_and_unload().eval()
            after = merged(**batch).logits
        diff = (unmerged - after).abs()[mask].max().item()
    if diff > MAX_ABS_DIFF:
        raise CheckFailed(f"the merged model's logits differ from base+adapter by {diff:.3g} (> {MAX_ABS_DIFF}); "
                          "the adapter does not match its base model.")
    out = merged_dir(run_id)
    with staging(out, replace=True) as tmp:
        merged.to(getattr(torch, save_dtype)).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        manifest.write(tmp, "merged-model", f"{run_id}/merged",
                       parents={"adapter": source["id"], "base_model": recipe.base_model}, dtype=save_dtype,
                       max_abs_logit_diff=diff, checkpoint=source["name"], step=source["step"],
                       hardware=hardware.summary())
    result = {"path": str(out), "dtype": save_dtype, "max_abs_logit_diff": diff, "positions": int(mask.sum()),
              "prompts": batch["input_ids"].shape[0], "checkpoint": source["name"], "step": source["step"],
              "label": source["label"]}
    write_json(run / "merge.json", result)
    from .trust import audit

    audit.record("merge", {"run": run_id, "base_model": recipe.base_model},
                 {"dtype": save_dtype, "max_abs_logit_diff": diff, "checkpoint": source["name"]})
    emit(Event("finished", STAGE, f"merged; max |logit diff| vs base+adapter {diff:.2e}", result))
    return result


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
