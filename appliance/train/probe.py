"""The throughput probe: how long this machine takes for one micro-batch of a run, measured, not assumed.

A constant tokens/s is right on the machine it was measured on and wrong on the next: bfloat16 that one CPU computes
in hardware another emulates 14x slower (issue 25). So on a CPU the plan's time comes from a probe of the kernels
the run will use: a model of the run's own shape (its config.json; random weights, no data) with one layer and with
a few, built by the trainer's own builder (``model.build``: the dtype, NF4, LoRA/DoRA, the attention, the
low-precision head), one micro-batch of the run's shape made by TRL's own collator (packed or padded), forward,
the native loss, backward and an AdamW step, timed. The difference between the layer counts is one layer's cost,
the rest the fixed part (embeddings, LM head and loss, optimizer): a step of the whole model is
``fixed + layers x per_layer``. A few seconds; the figure is cached per machine in the workspace
(``cache/throughput.json``) under a key of the CPU, its flags, the oneDNN cap and the libraries' versions, so a
new CPU or a new build measures again.

The measuring runs in a child process (``python -m appliance.train.probe``, a spec on stdin): the CLI and the TUI
never load torch to plan, and the child takes the run's thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REVISION = 1          # bump when what is measured changes: every cached figure is measured again
ENV_CACHE = "APPLIANCE_PROBE_CACHE"  # another cache file (the test suite shares one across its workspaces)
ENV_SWITCH = "APPLIANCE_THROUGHPUT_PROBE"  # "off": the plan's time from the constants (duration.py), no probe
MAX_PARAMS = 600e6    # a probe model (embeddings + its layers) bigger than this is not built: too slow to be a probe
EXTRA_LAYERS = 3      # layers of the second model beyond the first: enough that their cost stands above the noise
LIBRARIES = ("torch", "bitsandbytes", "transformers", "peft", "trl")
# The probe's threads got less than this share of their cores' time while it timed: other work was running, and
# the figure is not kept. Measured here: 0.90-0.99 alone (2 threads), 0.4-0.6 beside a busy process.
BUSY_SHARE = 0.75


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "no", "false")


def cache_path() -> Path:
    from ..workspace import home

    return Path(os.environ.get(ENV_CACHE) or home() / "cache" / "throughput.json")


def machine_key(hw) -> dict:
    """What the figures depend on besides the run's shape: the CPU and its flags, caps on its kernels, the
    libraries' versions (read from their metadata: nothing is imported)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": hw.cpu, "cores": hw.cores, "flags": list(hw.cpu_flags), "onednn_cap": hw.cpu_capped,
            "aten_capability": os.environ.get("ATEN_CPU_CAPABILITY"), "libraries": versions, "revision": REVISION}


def spec_for(config: dict, knobs, recipe, threads: int, row: int, doc: int) -> dict:
    """What one probe measures: the model's config, the knobs that change a step's kernels, the threads, and the
    micro-batch's shape (``row`` tokens a sequence, documents of ``doc`` tokens inside a packed row)."""
    lora = recipe.lora
    return {"config": config, "quant": knobs.quant, "double_quant": knobs.double_quant,
            "compute_dtype": knobs.compute_dtype, "grad_ckpt": knobs.grad_ckpt, "micro_batch": knobs.micro_batch,
            "row": int(row), "doc": int(max(1, min(doc, row))), "packing": knobs.packing, "threads": threads,
            "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                                "target_modules": lora.target_modules, "use_dora": lora.use_dora}}


def measured(spec: dict, hw, timeout: float = 600) -> dict:
    """{"micro_step_s", "per_layer_s", "fixed_s", "probe_s", "cached"} for ``spec`` on this machine, from the cache
    or measured now; {"error": why} when it cannot be measured (the plan then uses the constants and says so)."""
    from ..workspace import read_json, write_json

    machine = machine_key(hw)
    key = hashlib.sha256(json.dumps({"machine": machine, "spec": spec}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_path()
    try:
        cache = read_json(path)
    except (OSError, ValueError):
        cache = {}
    if cache.get("machine") != machine:  # another CPU or another build: nothing cached holds
        cache = {"machine": machine, "figures": {}}
    if key in cache["figures"]:
        return {**cache["figures"][key], "cached": True}
    params = _probe_params(spec)
    if params > MAX_PARAMS:
        return {"error": f"a probe of this model would build {params / 1e6:.0f}M parameters, too many to measure in "
                         "seconds"}
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        done = subprocess.run([sys.executable, "-m", "appliance.train.probe"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"the probe took more than {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": f"the probe failed: {why[:200]}"}
    figure = json.loads(lines[-1])
    figure["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if figure["cpu_share"] < BUSY_SHARE:
        # Other work took the cores while the probe ran: the figure is slow by that much. Used for this plan (it
        # says so), never cached, so the next plan measures again.
        return {**figure, "cached": False, "busy": True}
    try:  # re-read: another plan may have added figures meanwhile
        latest = read_json(path)
        if latest.get("machine") == machine:
            cache = latest
    except (OSError, ValueError):
        pass
    cache["figures"][key] = figure
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cache)
    return {**figure, "cached": False}


def _probe_params(spec: dict) -> float:
    cfg = spec["config"].get("text_config", spec["config"])
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads) * int(cfg.get("head_dim") or h // heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    embed = int(cfg["vocab_size"]) * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return embed + layer * min(int(cfg["num_hidden_layers"]), 1 + EXTRA_LAYERS)


# -- the child: build, time, print one JSON line -------------------------------------------------------------------

def _batch(spec: dict, vocab: int):
    """One micro-batch as the trainer gets it: TRL's collator over random token ids, packed (one row of
    documents, their boundaries for the attention) or padded, labels on the answer tokens."""
    import torch
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(0)
    micro, row, doc = spec["micro_batch"], spec["row"], spec["doc"]

    def example(n: int) -> dict:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]}

    if spec["packing"]:
        per_bin = max(1, row // doc)
        rows = list(pack_dataset(Dataset.from_list([example(doc) for _ in range(micro * per_bin)]),
                                 max(row, doc), "bfd"))[:micro]
        return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    return DataCollatorForLanguageModeling(pad_token_id=0)([example(row) for _ in range(micro)])


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _time_steps(model, batch, budget_s: float = 1.5, most: int = 4) -> tuple[float, float]:
    """(seconds of one training step: forward, native loss, backward, AdamW, the median of a few after a warm-up;
    the CPU time this process got per second of those steps)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # as the trainer keeps them (fp32 adapters)
        if p.dtype != torch.float32:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).flatten()
    model.train()

    def step() -> float:
        start = time.perf_counter()
        logits = model(**inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target, ignore_index=-100, reduction="none")
        loss = loss.float().sum() / (target != -100).sum().clamp(min=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warm = step()  # warm-up: first-call allocations, oneDNN's kernel selection
    cpu = _cpu_seconds()
    if warm > 10 * budget_s:  # an emulated dtype: one more step is figure enough, and minutes saved
        last = step()
        return min(warm, last), (_cpu_seconds() - cpu) / last
    times, spent = [], 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < most):
        times.append(step())
        spent += times[-1]
    # the fastest: a slower step is something else's time (a page fault, a kernel chosen late), not the step's
    return min(times), (_cpu_seconds() - cpu) / spent


def _measure(spec: dict) -> dict:
    import logging
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..recipes import from_dict
    from ..workspace import home
    from . import model as model_builder

    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    raw = dict(spec["config"])
    layers = int(raw.get("text_config", raw)["num_hidden_layers"])
    extra = min(EXTRA_LAYERS, layers - 1)
    recipe = from_dict({
        "name": "probe", "base_model": "probe", "dataset": "probe", "lora": spec["lora"],
        "quantization": {"method": spec["quant"], "double_quant": spec["double_quant"],
                         "compute_dtype": spec["compute_dtype"]},
        "training": {"max_steps": 1, "micro_batch_size": spec["micro_batch"], "max_seq_length": spec["row"],
                     "gradient_checkpointing": spec["grad_ckpt"], "packing": spec["packing"]}})
    dtype = spec["compute_dtype"]
    cache = home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # Random weights only (no data): written in the workspace, removed when measured.
    with tempfile.TemporaryDirectory(prefix=".probe-", dir=cache) as folder:
        config = AutoConfig.for_model(**{**raw, "num_hidden_layers": 1 + extra})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32 if spec["lora"] is None else getattr(torch, dtype)) \
            .save_pretrained(folder, safe_serialization=True)
        batch = _batch(spec, int(raw.get("text_config", raw)["vocab_size"]))
        timed, share = {}, []
        for _ in range(2):  # a second round when more layers did not take longer: one of the figures was noise
            for n in sorted({1, 1 + extra}):
                model, _ = model_builder.build(Path(folder), recipe, dtype, cuda=False, packing=spec["packing"],
                                               num_hidden_layers=n)
                took, used = _time_steps(model, batch)
                timed[n] = min(took, timed.get(n, took))
                share.append(used / spec["threads"])
                del model
            if not extra or timed[1 + extra] >= timed[1]:
                break
        if extra and timed[1 + extra] < 0.95 * timed[1]:  # beyond noise: the figures say nothing
            raise SystemExit(f"inconsistent timings: {1 + extra} layers took {timed[1 + extra]:.3f} s, one layer "
                             f"{timed[1]:.3f} s")
    per_layer = max(0.0, (timed[1 + extra] - timed[1]) / extra) if extra else 0.0
    fixed = max(0.0, timed[1] - per_layer)
    tokens = int(batch["input_ids"].numel() if "attention_mask" not in batch else batch["attention_mask"].sum())
    return {"micro_step_s": round(fixed + layers * per_layer, 4), "per_layer_s": round(per_layer, 5),
            "fixed_s": round(fixed, 4), "tokens": tokens, "layers": layers, "probe_s": round(time.perf_counter() - started, 1),
            "dtype": dtype, "threads": spec["threads"], "cpu_share": round(min(share), 2)}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.stdin.read()))))
