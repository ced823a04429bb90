"""How long a run will take, before spending it: an estimate from the work (steps, tokens) and measured throughput.

A step costs ``passes`` walks over the weights (forward, backward, and the recomputation when checkpointing),
each dequantizing every NF4 weight once, plus the arithmetic of its tokens: 2 FLOPs per parameter per token
forward, 2 backward for the activations' gradients, 2 more for the recomputation, 2 more for the weights'
gradients when every weight trains. The two rates come from measurements:

* a GPU's arithmetic rate is its dense bf16 tensor peak times the share the H200 rows of
  ``bench/gpu_measured.json`` reached (Llama-3.1-8B shape, QLoRA, micro-batch 1 and 4 x 2048 tokens with
  checkpointing: 3,310 and 5,751 tokens/s give 3.7e14 FLOP/s, 37% of 989 TFLOP/s, and 0.117 s per walk over the
  8.0B weights); other GPUs are scaled by their peak, so their figure is an estimate of an estimate;
* on this machine's CPU, a probe of the run's own shape (``train/probe.py``: one micro-batch, the run's dtype, NF4
  layer and attention, timed with one layer and with four, cached per machine); on a CPU that cannot be probed (a
  simulated profile, a model too big to probe in seconds, DPO) a core's rate is what ``bench/train_throughput.py
  --data demo`` measured on 2 cores with AVX512-BF16 (SmolLM2-135M, QLoRA, bf16 compute, checkpointing off): 507
  tokens/s, 1.4e11 FLOP/s a core; that figure is wrong on a CPU that emulates bfloat16, which is why it is the
  fallback only.

Model loading and export are not counted. Stated as an estimate everywhere it is shown.
"""

from __future__ import annotations

import math

H200_PEAK = 989e12
GPU_EFFICIENCY = 0.37          # the measured share of the tensor peak (H200 rows)
GPU_WALK_S_PER_PARAM = 1.46e-11  # one NF4 dequantizing walk over the weights, per parameter, on an H200
CPU_FLOPS_PER_CORE = 1.4e11
# DPO on a CPU: recipes/demo-dpo.yaml (SmolLM2-135M, 8 pairs of <= 160 tokens a step, 2 cores) trained 30 steps in
# ~350 s where the model above says 169 s: TRL's chunked LM head runs in fp32 for the policy's two sequences and
# the reference's, and the pairs are padded to the longer one. Measured, applied on CPUs only (no GPU DPO figure yet).
CPU_DPO_FACTOR = 2.0
# What the Trainer adds to each optimizer step beyond the probe's forward, backward and AdamW: the collator, gradient
# clipping, the scheduler, logging and our event callback (its memory sampling).
# Measured: the demo run here against its probe (bench/train_throughput.py --plan prints both).
CPU_STEP_OVERHEAD_S = 0.05
BYTES_PER_TOKEN = 3.0          # a JSON line per example over its chat-template tokens: 2.9 on the demo records
PACK_FILL = 0.95               # packed bins are this full on average (best fit decreasing)
# Dense bf16 tensor TFLOP/s (fp32 accumulate) from the vendors' data sheets, by a name fragment.
GPU_PEAKS = (("H200", 989), ("H100", 989), ("GH200", 989), ("B200", 2250), ("A100", 312), ("L40S", 362),
             ("L40", 181), ("RTX 6000 Ada", 364), ("4090", 165), ("4080", 97), ("A6000", 155), ("3090", 71),
             ("A10", 125), ("L4", 121), ("A30", 165), ("V100", 125), ("T4", 65))
UNKNOWN_GPU_PEAK = 100


def gpu_peak(name: str) -> tuple[float, bool]:
    """(dense bf16 FLOP/s, whether the GPU is in the table)."""
    found = next((tf for fragment, tf in GPU_PEAKS if fragment.lower() in name.lower()), None)
    return (found or UNKNOWN_GPU_PEAK) * 1e12, found is not None


def estimate(shape, knobs, hw, recipe, train: dict | None, validation: dict | None, replicas: int = 1,
             config: dict | None = None) -> dict:
    """The run's duration: {seconds, steps, tokens_per_step, tokens_per_s, evaluations, basis, measured}.

    ``train`` / ``validation``: {records, bytes} of the splits (``data.stats``), None when the data is not here
    (then only a ``max_steps`` run can be estimated, assuming full sequences). ``config``: the model's config.json,
    for the throughput probe on this machine's CPU (``train/probe.py``); without it, or on a GPU, a simulated
    machine or under DPO, the rates above."""
    t = recipe.training
    seq = knobs.seq_len
    mean = None
    if train and train["records"]:
        mean = min(seq, train["bytes"] / BYTES_PER_TOKEN / train["records"])
    row = seq * PACK_FILL if knobs.packing or mean is None else mean  # tokens in one sequence of a micro-batch
    if knobs.dpo:
        row *= 2  # a chosen and a rejected sequence per pair
    batch = knobs.micro_batch * knobs.grad_accum
    if t.max_steps:
        steps = t.max_steps
    elif train and train["records"]:
        rows = (math.ceil(train["records"] * mean / (seq * PACK_FILL)) if knobs.packing else train["records"])
        steps = math.ceil(t.num_epochs * rows / (batch * replicas))
    else:
        return {"seconds": None, "basis": "num_epochs needs the dataset's size, and the dataset is not here"}

    params = shape.total_params
    # DPO also runs the reference (the adapter's frozen copy) forward over every token: 2 more.
    per_token = params * (4 + (2 if knobs.grad_ckpt else 0) + (2 if knobs.full else 0) + (2 if knobs.dpo else 0))
    passes = 3 if knobs.grad_ckpt else 2
    if hw.gpus:
        peak, known = gpu_peak(hw.gpus[0].name)
        flops = peak * GPU_EFFICIENCY
        walk = GPU_WALK_S_PER_PARAM * H200_PEAK / peak * shape.linear_params if knobs.quant == "nf4" else 0.0
        where = f"{hw.gpus[0].name}" + ("" if known else " (not in the table: a 100 TFLOP/s guess)")
    else:
        cores = min(t.threads or hw.cores, hw.cores)
        flops, walk = CPU_FLOPS_PER_CORE * cores, 0.0
        where = f"{cores} CPU cores"
    micro_tokens = knobs.micro_batch * row
    step_s = knobs.grad_accum * (passes * walk + micro_tokens * per_token / flops)
    if knobs.dpo and not hw.gpus:
        step_s *= CPU_DPO_FACTOR
    measured = None
    if not hw.gpus and not hw.simulated and config is not None and not knobs.dpo:
        from .train import probe

        if probe.enabled():
            spec = probe.spec_for(config, knobs, recipe, cores, seq if knobs.packing else row,
                                  mean if mean is not None else seq * PACK_FILL)
            measured = probe.measured(spec, hw)
    failed = measured.get("error") if measured else None
    if measured and not failed:
        # the probe's micro-batch holds measured["tokens"]; the run's holds micro_tokens (packed bins fill less)
        micro_s = measured["micro_step_s"] * micro_tokens / max(1, measured["tokens"])
        step_s = knobs.grad_accum * micro_s + CPU_STEP_OVERHEAD_S
        flops = micro_tokens * per_token / micro_s  # the rate the probe implies, for the evaluation's forward passes
        how = ("cached" if measured.get("cached") else f"probed in {measured['probe_s']:.0f} s" +
               (f" while other work held the cores (the probe got {measured['cpu_share']:.0%} of them): slow by "
                "that much, not kept" if measured.get("busy") else ""))
        where = (f"{cores} CPU cores, measured here ({knobs.compute_dtype}: one layer {measured['per_layer_s']:.3f} s,"
                 f" the rest {measured['fixed_s']:.3f} s a micro-batch, {how})")
    evals = steps // t.eval_steps + (1 if steps % t.eval_steps else 0)
    eval_s = 0.0
    if validation and validation["records"]:
        val_tokens = validation["bytes"] / BYTES_PER_TOKEN
        eval_s = evals * (math.ceil(validation["records"] / knobs.micro_batch) * walk + val_tokens * 2 * params / flops)
    seconds = steps * step_s + eval_s
    tokens_step = batch * replicas * row
    source = (f"the table's rates, not this machine's ({failed})" if failed else
              "a probe of this machine (appliance/train/probe.py)" if measured else
              "measured throughput (appliance/duration.py)")
    return {"seconds": round(seconds, 1), "steps": steps, "tokens_per_step": round(tokens_step),
            "tokens_per_s": round(tokens_step / step_s), "evaluations": evals, "eval_seconds": round(eval_s, 1),
            "measured": bool(measured and not failed), "compute_dtype": knobs.compute_dtype,
            "basis": f"{steps} steps of ~{tokens_step:,.0f} tokens at ~{tokens_step / step_s:,.0f} tokens/s on "
                     f"{where}, plus {evals} evaluation{'s' if evals != 1 else ''}; from {source}, loading and "
                     "export not counted"}


def text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"
