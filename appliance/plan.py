"""The memory planner: will this run fit each device, why, and what would make it fit.

``estimate`` breaks the peak memory of one training replica into its parts, from
the base model's config.json alone (no weights needed):

- weights at their precision: NF4 (0.5 byte a parameter, plus one absmax per
  64-value block: fp32, or 8-bit with a second fp32 level per 256 blocks under
  double quantization), 8-bit, 16-bit or 32-bit; embeddings, norms and an
  untied LM head (``weights_other``) stay out of quantization, and for QLoRA
  in fp32: PEFT's ``prepare_model_for_kbit_training`` upcasts them;
- LoRA parameters, their gradients (fp32: the worker trains adapters in fp32)
  and the optimizer's states (AdamW 8 bytes a parameter, 8-bit AdamW 2, SGD 0);
- activations, per token and layer, as a function of micro-batch, sequence
  length, hidden size, MLP size and layers: without gradient checkpointing a
  Llama-style layer with LoRA keeps ~``ACT_H`` hidden-sized and ~``ACT_I``
  MLP-sized tensors for the backward pass; with it, only each layer's input is
  kept (in the residual stream's dtype: fp32 under QLoRA, as the embeddings
  are), plus one layer's full working set while it is recomputed; with
  activation offloading, the saved tensors wait in host memory;
- the LM head and loss as the worker runs them: on CUDA TRL's fused, chunked
  head (the logits are never materialized), so only its tiles count; on a CPU
  the native head and cross-entropy in the compute dtype (the full logits, the
  saved log-probabilities and their gradient); ``lm_head="full"`` models a
  trainer that materializes fp32 logits;
- a fixed runtime: on a GPU the process's memory outside torch's allocator (the
  CUDA context, cuBLAS workspaces and kernels, which is what an out-of-memory
  error is decided on together with the allocator's reservation), on a CPU the
  Python process with torch, transformers, PEFT and TRL (measured);
- an allocator margin: what the caching allocator reserves beyond live tensors.

Packing (the default) does not change the peak: a micro-batch is at most
micro-batch x max_seq_length tokens either way; on a CPU it drops the attention
scores SDPA's masked path keeps, since each document runs its own causal kernel.

``make_plan`` compares the estimate with each device's limit (90% of its
memory by default). Knobs the recipe leaves to it (``micro_batch_size: auto``,
``gradient_checkpointing: auto``) it sets to the fastest that fits: checkpointing
off when a micro-batch of at least ``BUSY_TOKENS`` tokens (or the whole batch)
fits without it, and the largest micro-batch that fits, gradient accumulation
making up the effective batch. Knobs the recipe states are kept unless the run
would not fit; then it applies the adjustments in order: gradient checkpointing
on; micro-batch down with gradient accumulation up (the effective batch kept);
an 8-bit optimizer; shorter sequences only with the user's consent. When nothing
fits it says what would: QLoRA instead of LoRA, a smaller model, more GPUs. With
two or more GPUs it chooses data parallelism when one replica fits a GPU, else
splitting the model across them.

The constants are checked against measurements: peak RSS of real CPU runs here
(tests/test_plan.py, bench/plan_accuracy.py) and published GPU figures
(``PUBLISHED`` below, printed side by side by the benchmark).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import checks, duration
from .errors import InvalidInput, NotFound

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}
# Saved for backward per token and layer, in units of the hidden size and of the MLP size, times the activations'
# bytes (Llama-style layer, frozen base, LoRA on every linear layer): norms' inputs and outputs, q/k/v/o inputs and
# outputs, attention output; gate, up, their activation and product; LoRA's dropout and casts.
# CPU: fitted to peak RSS of real runs here (bench/plan_accuracy.py, part 1). CUDA: fitted to the H200 rows of
# bench/gpu_measured.json (Llama-3.1-8B shape, QLoRA, bf16 autocast, LoRA dropout 0.05): 348 kB a token and layer
# without checkpointing, where bf16 casts of an fp32 residual stream double what a pure-bf16 layer keeps.
ACT_H = 14.5              # bf16 compute on a CPU: the quantized layers' inputs and outputs are bf16 copies
ACT_I = 5.8
CPU_FP32_ACT = 1.28       # fp32 compute on a CPU: every saved tensor is fp32 (fitted to the rows of a random Llama)
CPU_CKPT_KEPT = 0.4        # with checkpointing a CPU run keeps 40% of a layer's working set per layer (measured: the
                           # reentrant checkpoint should keep only its input; not yet understood), one layer's in full
CUDA_ACT_H = 20.0
CUDA_ACT_I = 6.4
CKPT_KEPT = 1.2            # with checkpointing, a layer's input plus RoPE tables and norms' statistics (CUDA rows)
CUDA_RUNTIME = 1536 * MiB  # outside the allocator on an H200, torch 2.11 + CUDA 13: context, cuBLAS, bnb kernels
CPU_RUNTIME = 720 * MiB    # RSS of the training process here once torch, transformers, PEFT, TRL and bnb are loaded
ALLOCATOR_MARGIN = 0.08    # the caching allocator's reservation beyond live tensors (H200 rows: 2-8%)
CPU_ALLOCATOR_MARGIN = 0.12  # glibc's arenas on a CPU (peak RSS of the same run varies 10-20% run to run)
BUSY_TOKENS = 2048         # a micro-batch this big keeps a GPU's matmuls busy: below it, checkpointing on and a
                           # bigger micro-batch is the faster way to the same effective batch
DPO_HEAD = 13              # bytes per token and vocabulary entry that a DPO step holds beyond the LM head's tiles
DEFAULT_LIMIT = 0.90


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer, read from its config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def linear_params(self) -> int:
        """Parameters of the linear layers of all blocks (what bitsandbytes quantizes)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        q_out = self.heads * self.head_dim
        return self.layers * (h * q_out + 2 * h * kv + q_out * h + 3 * h * i)

    @property
    def other_params(self) -> int:
        """Embeddings, an untied LM head and the norms: kept in the compute dtype."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params

    def targets(self, targets: str | list[str]) -> list[tuple[int, int]]:
        """(in, out) features of each adapted linear layer of a block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        q_out = self.heads * self.head_dim
        dims = {"q_proj": (h, q_out), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q_out, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return [dims[n] for n in (list(dims) if targets == "all-linear" else [t for t in targets if t in dims])]

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        return self.layers * sum(r * (d_in + d_out) for d_in, d_out in self.targets(targets))

    def dora_params(self, targets: str | list[str]) -> tuple[int, int, int]:
        """DoRA on top of LoRA: (magnitude parameters, one output per target; output features per token and
        layer, which DoRA keeps for its backward pass; the largest target weight, which it rebuilds in the
        compute dtype to take its norm)."""
        dims = self.targets(targets)
        outs = sum(d_out for _, d_out in dims)
        return self.layers * outs, outs, max((d_in * d_out for d_in, d_out in dims), default=0)


@dataclass(frozen=True)
class Knobs:
    """The recipe's settings that memory depends on."""

    quant: str = "nf4"                # nf4 | int8 | none (16-bit base)
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    lora_r: int = 16
    lora_targets: str | tuple = "all-linear"
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    grad_ckpt: bool = False
    optimizer: str = "adamw_torch"
    lm_head: str = "auto"            # auto: as the worker runs it (CUDA: TRL's fused head; CPU: native) | chunked | full
    packing: bool = False
    offload: bool = False            # activation offloading
    auto: tuple = ()                 # knobs left to the plan: "micro_batch", "grad_ckpt"
    dora: bool = False
    dpo: bool = False                 # preference pairs: a chosen and a rejected sequence per example
    full: bool = False                # full fine-tuning: every weight trains (fp32 master weights)
    strategy: str = "auto"            # auto | ddp | fsdp | split: the recipe's training.strategy
    cpu_offload: bool = False         # FSDP keeps its shards (weights, gradients, optimizer states) in host memory

    @classmethod
    def from_recipe(cls, recipe) -> "Knobs":
        t = recipe.training
        lora = recipe.lora
        targets = lora.target_modules if lora else "all-linear"
        auto = tuple({"micro_batch_size": "micro_batch", "gradient_checkpointing": "grad_ckpt"}[key] for key in t.auto)
        micro = t.effective_batch if "micro_batch" in auto else t.micro_batch_size
        dpo = recipe.method == "dpo"
        return cls(quant=recipe.quantization.method, double_quant=recipe.quantization.double_quant,
                   compute_dtype=recipe.quantization.compute_dtype, lora_r=lora.r if lora else 0,
                   lora_targets=targets if isinstance(targets, str) else tuple(targets),
                   micro_batch=micro, grad_accum=1 if "micro_batch" in auto else t.gradient_accumulation_steps,
                   seq_len=t.max_seq_length, grad_ckpt=t.gradient_checkpointing is True, optimizer=t.optimizer,
                   packing=t.packing and not dpo, offload=t.activation_offloading, auto=auto,
                   dora=bool(lora and lora.use_dora), dpo=dpo, full=lora is None, strategy=t.strategy,
                   cpu_offload=t.fsdp_cpu_offload)


def shape_from_config(config: dict, name: str = "model") -> Shape:
    cfg = config.get("text_config", config)  # multimodal configs nest the language model's
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        shape = Shape(name=name, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                      layers=int(cfg["num_hidden_layers"]), heads=heads,
                      kv_heads=int(cfg.get("num_key_value_heads") or heads),
                      head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                      tied=bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"the config of {name} lacks {e} (hidden_size, intermediate_size, num_hidden_layers, "
                           "num_attention_heads, vocab_size are needed); is it a decoder-only language model?") from None
    return shape


def load_shape(base_model: str, config_path: str | Path | None = None, near: Path | None = None) -> tuple[Shape, str]:
    """The model's shape and where its config came from: ``config_path``, the imported model, or a
    ``configs/<base_model>.json`` beside the recipe (planning before the weights are on the machine)."""
    from .workspace import folder

    candidates = []
    if config_path:
        p = Path(config_path).expanduser()
        candidates.append(p / "config.json" if p.is_dir() else p)
    candidates.append(folder("models") / base_model / "config.json")
    if near is not None:
        candidates.append(near / "configs" / f"{base_model}.json")
    for path in candidates:
        if path.is_file():
            try:
                return shape_from_config(json.loads(path.read_text()), base_model), str(path)
            except ValueError:
                raise InvalidInput(f"{path} is not valid JSON; give the model's config.json.") from None
        if config_path and path == candidates[0]:
            raise NotFound(f"{path} does not exist; give the base model's config.json (or its folder).")
    raise NotFound(f"no model with id {base_model!r}: import it with `appliance models import PATH --name "
                   f"{base_model}`, or pass --model-config with its config.json to plan before copying the weights.")


def estimate(shape: Shape, k: Knobs, device: str = "cuda", shards: int = 1, fsdp: bool = False) -> dict[str, int]:
    """Peak bytes of one training process, by part. ``shards`` splits the model's layers over that many GPUs
    (model parallelism): weights, adapters and activations divide, the runtime does not.

    ``fsdp``: FSDP over ``shards`` processes (each a whole data-parallel replica that holds 1/shards of the state).
    Sharded: the 4-bit weights (stored in the compute dtype, ``bnb_4bit_quant_storage``, so FSDP can shard them
    like any tensor), the adapter, its gradients and optimizer states; with ``cpu_offload`` those live in host
    memory instead. Whole on each GPU: the activations and the LM head of its own micro-batch, the layers
    all-gathered for compute (the one running and the one prefetched), and the root module's parameters
    (embeddings, final norm, LM head), which FSDP keeps gathered from forward to backward. The frozen non-4-bit
    weights stay in the compute dtype: the FSDP path skips PEFT's fp32 upcast, which would mix dtypes in a shard."""
    dtype = DTYPE_BYTES[k.compute_dtype]
    if k.quant == "nf4":
        per_param = 0.5 + ((1 + 4 / 256) / 64 if k.double_quant else 4 / 64)
    elif k.quant == "int8":
        per_param = 1.0 + 4 / 4096  # one fp32 scale per row of a 4096-wide matrix
    else:
        per_param = dtype if device == "cpu" else 2  # LoRA on a 16-bit base
    targets = k.lora_targets if isinstance(k.lora_targets, str) else list(k.lora_targets)
    lora = shape.lora_params(k.lora_r, targets)
    magnitudes, dora_outs, dora_weight = shape.dora_params(targets) if k.dora else (0, 0, 0)
    lora += magnitudes
    tokens = k.micro_batch * k.seq_len * (2 if k.dpo else 1)  # DPO: chosen and rejected in one forward
    h, i = shape.hidden, shape.intermediate
    # QLoRA: prepare_model_for_kbit_training upcasts embeddings, norms and the LM head to fp32, so the residual
    # stream (each layer's input) is fp32 too; the layers' matmuls run in the compute dtype (autocast on CUDA).
    other = 4 if k.quant == "nf4" and not fsdp else dtype
    lm_head = k.lm_head if k.lm_head != "auto" else ("fused" if device == "cuda" or k.dpo else "native")
    # No autocast on a CPU: the residual stream and what the backward pass keeps are fp32; a padded batch takes
    # SDPA's math path, which keeps the scores and the probabilities (heads x seq per token); packed documents
    # each run a causal flash-style kernel, which keeps none.
    act = 4 if device == "cpu" else dtype
    if device == "cpu":
        attention = 0 if k.packing else 2 * shape.heads * k.seq_len * act
        scale = CPU_FP32_ACT if k.compute_dtype == "float32" else 1.0
        per_token_layer = scale * (ACT_H * h + ACT_I * i) * act + attention
        kept = CPU_CKPT_KEPT * per_token_layer
    else:
        per_token_layer = (CUDA_ACT_H * h + CUDA_ACT_I * i) * act
        kept = CKPT_KEPT * h * other
    if k.dora:  # each target's base output, kept for the magnitude's gradient
        per_token_layer += dora_outs * act
    if k.offload and device == "cuda":  # the saved tensors wait in host memory; two layers' worth are in flight
        activations = tokens * 2 * (kept if k.grad_ckpt else per_token_layer) + tokens * per_token_layer
    elif k.grad_ckpt:
        activations = tokens * (shape.layers * kept + per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    tile = min(tokens, 4096) * min(shape.vocab, 32768)  # TRL's fused LM head: token x vocab tiles
    if lm_head == "full":
        head = tokens * shape.vocab * (2 * dtype + 8)  # logits, their fp32 copy, its gradient, the 16-bit gradient
    elif lm_head == "chunked":
        head = tokens * shape.vocab * dtype + tokens * shape.vocab * 4 // 8  # 16-bit logits, one fp32 chunk of 8
    elif lm_head == "native":
        head = 3 * tokens * shape.vocab * dtype  # the logits, the saved log-probabilities, their gradient
    else:
        head = 2 * tile * dtype + tokens * 32  # a tile and its gradient in place; per-token statistics
    parts = {
        "weights": int(shape.linear_params * per_param / shards),
        "weights_other": int(shape.other_params * other / (1 if fsdp else shards)),
        "lora": lora * 4 // shards,
        "gradients": lora * 4 // shards,
        "optimizer": lora * OPTIMIZER_BYTES[k.optimizer] // shards,
        "activations": int(activations / (1 if fsdp else shards)),
        "logits": int(head),
    }
    if k.full:  # every weight trains: fp32 master weights, their gradients and the optimizer's states
        params = shape.total_params
        parts.update(weights=params * 4 // shards, weights_other=0, lora=0, gradients=params * 4 // shards,
                     optimizer=params * OPTIMIZER_BYTES[k.optimizer] // shards)
    if k.dpo:  # TRL's frozen copy of the adapter the run starts from: the reference
        parts["reference"] = lora * 4 // shards
        # DPO's log-probabilities of both sequences, the reference's and their gradients: fitted to two CPU rows of
        # bench/plan_accuracy.py (random 512x4 fp32 and SmolLM2 bf16, 1.3-1.5 GB beyond the rest at 2,048 tokens);
        # which tensors they are is not pinned down. Counted on GPUs too until a GPU row says otherwise.
        parts["logits"] += int(DPO_HEAD * tokens * shape.vocab)
    if k.dora:  # the rebuilt weight whose norm DoRA takes, one target at a time
        parts["dora_weight"] = int(dora_weight * 4 / shards)
    if fsdp:
        layer = shape.linear_params * (4 if k.full else per_param) / shape.layers
        parts["gathered"] = int(2 * layer)  # the layer computing and the next, all-gathered ahead of it
        if k.cpu_offload:  # the shards wait in host memory (host_estimate counts them there)
            for part in ("weights", "lora", "gradients", "optimizer", "reference"):
                if part in parts:
                    parts[part] = 0
    margin = CPU_ALLOCATOR_MARGIN if device == "cpu" else ALLOCATOR_MARGIN
    parts["allocator_margin"] = int(margin * sum(parts.values()))
    parts["runtime"] = CUDA_RUNTIME if device == "cuda" else CPU_RUNTIME
    return parts


def host_estimate(shape: Shape, k: Knobs, shards: int, local: int) -> int:
    """Host memory of an FSDP run on one machine with ``local`` of its ``shards`` processes: the first process
    loads the quantized model into host memory before it is sharded (the others load nothing: accelerate's
    ``cpu_ram_efficient_loading``), with CPU offload the local processes' shards live there for the whole run,
    plus each process's Python, torch and libraries."""
    gpu = estimate(shape, replace(k, cpu_offload=False), "cuda", shards, fsdp=True)
    loaded = gpu["weights"] * shards + gpu["weights_other"]
    states = sum(gpu[p] for p in ("lora", "gradients", "optimizer", "reference") if p in gpu)
    offloaded = (loaded / shards + states) * local if k.cpu_offload else 0
    return int(max(loaded, offloaded) + local * CPU_RUNTIME)


@dataclass
class Device:
    name: str
    kind: str        # cuda | cpu
    capacity: int    # bytes
    limit: int       # bytes the plan may use


def devices(hw, limit: float = DEFAULT_LIMIT) -> list[Device]:
    if hw.gpus:
        return [Device(f"cuda:{g.index} {g.name}", "cuda", g.memory_total, int(g.memory_total * limit)) for g in hw.gpus]
    return [Device("cpu (RAM)", "cpu", hw.ram_total, int(hw.ram_total * limit))]


# Bytes per weight of llama.cpp's quantizations, from llama-quantize's table (Llama-3-8B, 8.03B weights:
# Q4_0 4.34G, Q4_K_M 4.58G, Q5_K_M 5.33G, Q8_0 7.96G, in GiB, against 14.96 GiB at 16 bits).
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.064, "q5_k_m": 0.713, "q4_k_m": 0.612, "q4_0": 0.580}


def footprint(shape: Shape, k: Knobs, recipe, steps: int | None, hw, fsdp: bool, base_dtype: str = "bfloat16",
              tokenizer: int = 0, limit: float = DEFAULT_LIMIT) -> dict:
    """What the run leaves on disk and needs after training, before it starts: its checkpoints (adapter and
    optimizer states; under FSDP the sharded adapter too), the merged model, the GGUF files of the recipe's
    quantizations; and the host memory of merge (streamed: a few tensors) and of export (llama.cpp holds the
    f16 GGUF for its top-1 check). Estimates; disk against the free space at the workspace. ``tokenizer``: the bytes of the
    tokenizer's files, which every checkpoint, the adapter and the merged model carry (and a GGUF its vocabulary)."""
    t = recipe.training
    targets = k.lora_targets if isinstance(k.lora_targets, str) else list(k.lora_targets)
    trainable = shape.total_params if k.full else shape.lora_params(k.lora_r, targets)
    weights = 4 if k.full else DTYPE_BYTES[k.compute_dtype]
    checkpoint = trainable * (weights + OPTIMIZER_BYTES[k.optimizer]) + tokenizer
    if fsdp and not k.full:  # the sharded trained weights beside the adapter's own files (transformers saves
        checkpoint += trainable * weights  # FSDP checkpoints adapter_only: the frozen 4-bit ones are not in them)
    written = steps // t.save_steps if steps else None
    kept = None if written is None else (min(written, t.keep_checkpoints) + (written > t.keep_checkpoints)
                                         if t.keep_checkpoints else written)
    merged = shape.total_params * DTYPE_BYTES.get(base_dtype, 2) + tokenizer
    quants = ["f16", *[q for q in recipe.export.quant if q != "f16"]]
    gguf = {q: int(shape.total_params * GGUF_BYTES[q] + tokenizer / 2) for q in quants}  # vocabulary and merges
    disk = (kept or 0) * checkpoint + trainable * weights + tokenizer + merged + sum(gguf.values())
    host = merge_host(shape, trainable, base_dtype)
    export = export_host(shape, gguf["f16"])
    return {"checkpoint": int(checkpoint), "checkpoints": kept, "keep": t.keep_checkpoints, "merged": int(merged),
            "gguf": gguf, "disk": int(disk), "disk_free": hw.disk_free, "disk_fits": disk <= hw.disk_free,
            "merge_host": int(host), "ram": hw.ram_total, "merge_host_fits": host <= hw.ram_total * limit,
            "export_host": int(export), "export_host_fits": export <= hw.ram_total * limit}


def merge_host(shape: Shape, adapter_params: int, base_dtype: str = "bfloat16") -> int:
    """Host memory of `appliance merge` (merge.py): it streams, so what counts is its largest tensor at work,
    not the model. A merged weight is read (its dtype), upcast, added to B A in float32 and cast back, then
    checked against base + adapter (merged and base read back and upcast: ~24 bytes per element); the
    embeddings are only cast and compared (~6 bytes). The float32 logits check of small models holds the model in
    float32 (up to merge.LOGIT_CHECK_MAX_BYTES). Plus the adapter and the libraries' own memory."""
    h, i = shape.hidden, shape.intermediate
    largest_adapted = max(h * i, h * shape.heads * shape.head_dim)
    working = max(24 * largest_adapted, (4 + 2 * DTYPE_BYTES.get(base_dtype, 2)) * shape.vocab * h)
    fp32 = shape.total_params * 4
    logit_check = fp32 * 1.2 if fp32 <= LOGIT_CHECK_MAX_BYTES else 0  # (merge.LOGIT_CHECK_MAX_BYTES)
    return int(CPU_RUNTIME + max(working, logit_check) + 4 * adapter_params)


def export_host(shape: Shape, f16_gguf: int) -> int:
    """Host memory of `appliance export`: llama.cpp holds the f16 GGUF (mapped, every page read) for the top-1
    check; the float32 reference of the merged model runs one layer at a time (layerwise.py: the embeddings and
    one block in float32, and the logits of the held-out batch), which is less."""
    layer = shape.linear_params // max(shape.layers, 1)
    reference = 4 * (shape.vocab * shape.hidden + 2 * layer) + 4 * 8 * 512 * shape.vocab * 2
    return int(CPU_RUNTIME + max(f16_gguf, reference))


LOGIT_CHECK_MAX_BYTES = 2 << 30  # as merge.LOGIT_CHECK_MAX_BYTES (plan cannot import merge: it would load torch)


def footprint_lines(f: dict) -> list[str]:
    """The footprint in two sentences (the CLI's plan and the Plan screen say the same)."""
    def size(n: int) -> str:
        return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"

    if f["checkpoints"] is None:
        ckpt = f"checkpoints of {size(f['checkpoint'])} each (their number needs the run's length), "
    else:
        which = f"the newest {f['keep']} and the best" if f["keep"] else "all kept"
        ckpt = f"{f['checkpoints']} checkpoints of {size(f['checkpoint'])} ({which}), "
    files = ", ".join(f"{q} {size(b)}" for q, b in f["gguf"].items())
    disk = (f"disk: about {size(f['disk'])} of {size(f['disk_free'])} free at the workspace "
            f"{'ok' if f['disk_fits'] else 'TOO LITTLE'}: {ckpt}the merged model {size(f['merged'])}, GGUF {files}"
            + ("" if f["disk_fits"] else "; free space, or keep fewer checkpoints (training.keep_checkpoints) "
                                         "and export fewer quantizations (export.quant)"))
    host = (f"merge: about {size(f['merge_host'])} of host memory of {size(f['ram'])} "
            f"{'ok' if f['merge_host_fits'] else 'TOO MUCH'} (it streams the model a tensor at a time); export: "
            f"about {size(f['export_host'])} {'ok' if f['export_host_fits'] else 'TOO MUCH'} (llama.cpp holds the "
            "f16 GGUF for its top-1 check)")
    if not f["export_host_fits"]:
        host += "; merging fits, but checking the f16 GGUF needs a machine with that much memory"
    return [disk, host]


def make_plan(shape: Shape, knobs: Knobs, hw, limit: float = DEFAULT_LIMIT, allow_shorter: bool = False) -> dict:
    """The verdict for this hardware: fits | fits_after_adjustment | does_not_fit, with the breakdown per device,
    the adjustments made (in order) and, when nothing fits, what would."""
    if not 0.1 <= limit <= 1.0:
        raise InvalidInput(f"--limit {limit} is out of range; use a fraction of each device's memory, 0.1 to 1.0.")
    devs = devices(hw, limit)
    kind = devs[0].kind
    requested_dtype = knobs.compute_dtype
    smallest = min(d.limit for d in devs)

    def total(k: Knobs, shards: int = 1) -> int:
        return sum(estimate(shape, k, kind, shards).values())

    n = len(devs)
    knobs, dtype_choice, dtype_step = _dtype(knobs, hw, total)

    def sharded(k: Knobs) -> int:
        return sum(estimate(shape, k, kind, n, fsdp=True).values())

    def need(k: Knobs) -> int:
        """Per GPU under the leanest layout the recipe allows: one replica, FSDP, or the layers split over them."""
        if kind == "cpu" or n == 1 or k.strategy == "ddp":
            return total(k)
        return min({"auto": (total(k), sharded(k), total(k, n)), "fsdp": (sharded(k),),
                    "split": (total(k, n),)}[k.strategy])

    # A replica per GPU first (DDP moves only the adapter's gradients), with every adjustment it needs; only when
    # none makes it fit, FSDP or the split, for which the same adjustments are made on their per-GPU need.
    first = total if knobs.strategy in ("auto", "ddp") else need
    k, choices, steps, shorter_needed = _adjust(knobs, first, smallest, kind, allow_shorter)
    if knobs.strategy == "auto" and total(k) > smallest and n > 1:
        k, choices, steps, shorter_needed = _adjust(knobs, need, smallest, kind, allow_shorter)

    choices = dtype_choice + choices
    steps = dtype_step + steps
    strategy = _strategy(k, devs, total, sharded)
    shards = strategy["shards"]
    per_device = []
    for d in devs:
        parts = estimate(shape, k, kind, shards if strategy["mode"] in ("split", "fsdp") else 1,
                         fsdp=strategy["mode"] == "fsdp")
        used = sum(parts.values())
        per_device.append({"device": d.name, "capacity": d.capacity, "limit": d.limit, "estimate": used,
                           "fits": used <= d.limit, "breakdown": parts})
    fits = all(p["fits"] for p in per_device[: shards if strategy["mode"] == "split" else len(devs)])
    verdict = ("fits" if not steps else "fits_after_adjustment") if fits else "does_not_fit"
    plan = {
        "model": asdict(shape) | {"parameters": shape.total_params},
        "hardware": hw.simulated or ("cpu" if kind == "cpu" else f"{len(devs)} GPU"),
        "limit_fraction": limit,
        "verdict": verdict,
        "knobs": _knobs_dict(k),
        # the plan sets what the recipe left to it (and with an auto micro-batch, the accumulation too)
        "requested": _knobs_dict(knobs) | {a: "auto" for a in knobs.auto} | {"compute_dtype": requested_dtype}
                     | ({"grad_accum": "auto"} if "micro_batch" in knobs.auto else {}),
        "choices": choices,
        "adjustments": steps if fits else [],
        "strategy": strategy,
        "devices": per_device,
    }
    if strategy["mode"] == "fsdp" and kind == "cuda":
        host = host_estimate(shape, k, shards, shards)
        plan["host"] = {"estimate": host, "capacity": hw.ram_total, "fits": host <= hw.ram_total * limit,
                        "why": "the first process loads the 4-bit model here before sharding it"
                               + ("; the offloaded shards stay here" if k.cpu_offload else "")}
        fits = fits and plan["host"]["fits"]
        plan["verdict"] = verdict if fits else "does_not_fit"
    if not fits:
        plan["adjustments"] = []
        plan["would_fit"] = _alternatives(shape, k, devs, kind, shorter_needed, total)
    return plan


def _dtype(k: Knobs, hw, total) -> tuple[Knobs, list[dict], list[dict]]:
    """The compute dtype: ``auto`` becomes what the hardware computes natively (a choice); a recipe's bfloat16 where
    the hardware only emulates it becomes float32 on a CPU, float16 on an older GPU (an adjustment that says why and
    what it costs in memory). (knobs, choices, adjustments)."""
    from .hardware import compute_dtype

    native, why = compute_dtype(hw)
    if k.compute_dtype == "auto":
        return replace(k, compute_dtype=native), [{"change": f"compute dtype {native}", "why": why,
                                                   "key": "compute_dtype"}], []
    emulated = k.compute_dtype == "bfloat16" and native != "bfloat16"
    if not emulated or k.full and native == "float32":  # full fine-tuning keeps fp32 weights; its autocast is GPU-only
        return k, [], []
    to = replace(k, compute_dtype=native)
    more = total(to) - total(k)
    cost = (f"it needs {more / GiB:.2f} GiB more memory" if more > 0 else
            f"it needs {-more / GiB:.2f} GiB less memory" if more < 0 else "the memory is the same")
    return to, [], [{"change": f"compute dtype bfloat16 -> {native}", "key": "compute_dtype",
                     "why": f"{why}; {cost} (set quantization.compute_dtype: auto to have the plan choose)"}]


def _adjust(knobs: Knobs, need, smallest: int, kind: str, allow_shorter: bool):
    """The knobs left to the plan set, then the adjustments in order until ``need`` (bytes per device) fits:
    (knobs, choices, adjustments, the shorter max_seq_length that would fit or None)."""
    steps: list[dict] = []
    k, choices = _fastest(knobs, need, smallest, kind) if knobs.auto else (knobs, [])
    if need(k) > smallest and not k.grad_ckpt:
        k = replace(k, grad_ckpt=True)
        steps.append({"change": "gradient checkpointing on",
                      "why": "keeps one input per layer instead of every activation; ~30% slower steps"})
    while need(k) > smallest and k.micro_batch > 1:
        k = replace(k, micro_batch=k.micro_batch // 2, grad_accum=k.grad_accum * 2)
        steps.append({"change": f"micro-batch {k.micro_batch * 2} -> {k.micro_batch}, gradient accumulation "
                                f"{k.grad_accum // 2} -> {k.grad_accum}",
                      "why": f"the effective batch stays {k.micro_batch * k.grad_accum}"})
    if need(k) > smallest and OPTIMIZER_BYTES[k.optimizer] > 2 and kind == "cuda":
        k = replace(k, optimizer="paged_adamw_8bit")
        steps.append({"change": f"optimizer {knobs.optimizer} -> paged_adamw_8bit",
                      "why": "2 bytes of state per adapter parameter instead of 8, paged to host memory under pressure"})
    shorter_needed = None
    if need(k) > smallest:
        seq = k.seq_len
        while seq > 256 and need(replace(k, seq_len=seq)) > smallest:
            seq //= 2
        if need(replace(k, seq_len=seq)) <= smallest:
            shorter_needed = seq
            if allow_shorter:
                k = replace(k, seq_len=seq)
                steps.append({"change": f"max_seq_length {knobs.seq_len} -> {seq}",
                              "why": "you allowed shorter sequences; longer examples are truncated"})
    return k, choices, steps, shorter_needed


def _fastest(k: Knobs, total, limit: int, kind: str) -> tuple[Knobs, list[dict]]:
    """The fastest settings that fit for the knobs left to the plan: checkpointing off if it fits with a
    micro-batch big enough to keep a GPU busy (any on a CPU, where recomputation is pure cost), and the largest
    micro-batch dividing the effective batch. Nothing fits: the smallest, for the adjustments to go on from."""
    batch = k.micro_batch * k.grad_accum
    micros = [m for m in range(batch, 0, -1) if batch % m == 0] if "micro_batch" in k.auto else [k.micro_batch]
    ckpts = [False, True] if "grad_ckpt" in k.auto else [k.grad_ckpt]
    busy = min(BUSY_TOKENS, batch * k.seq_len) if kind == "cuda" else 0

    def candidate(m: int, ckpt: bool) -> Knobs:
        accum = batch // m if "micro_batch" in k.auto else k.grad_accum
        return replace(k, micro_batch=m, grad_accum=accum, grad_ckpt=ckpt)

    for ckpt in ckpts:
        m = next((m for m in micros if total(candidate(m, ckpt)) <= limit), None)
        if m is None or (not ckpt and len(ckpts) > 1 and m * k.seq_len < busy):
            continue
        c = candidate(m, ckpt)
        out = []
        if "grad_ckpt" in k.auto:
            out.append({"change": f"gradient checkpointing {'on' if ckpt else 'off'}",
                        "why": ("every activation fits: no recomputation, ~25% faster steps" if not ckpt else
                                f"without it no micro-batch of {busy} tokens or more fits")})
        if "micro_batch" in k.auto:
            out.append({"change": f"micro-batch {m} x gradient accumulation {c.grad_accum}",
                        "why": f"the largest micro-batch that fits; the effective batch stays {batch}"})
        return c, out
    smallest = candidate(micros[-1], ckpts[-1])
    return smallest, [{"change": f"micro-batch {smallest.micro_batch} x gradient accumulation {smallest.grad_accum}"
                                 f"{', gradient checkpointing on' if 'grad_ckpt' in k.auto else ''}",
                       "why": "the smallest footprint the recipe allows; it still needs more than one device holds"}]


def recipe_changes(plan: dict) -> dict[str, object]:
    """The recipe keys an adjusted plan changes, as dotted overrides (for `appliance train`)."""
    names = {"micro_batch": "training.micro_batch_size", "grad_accum": "training.gradient_accumulation_steps",
             "seq_len": "training.max_seq_length", "grad_ckpt": "training.gradient_checkpointing",
             "optimizer": "training.optimizer", "compute_dtype": "quantization.compute_dtype"}
    return {names[k]: v for k, v in plan["knobs"].items() if k in names and plan["requested"][k] != v}


def _knobs_dict(k: Knobs) -> dict:
    d = asdict(k)
    d["effective_batch"] = k.micro_batch * k.grad_accum
    return d


def _strategy(k: Knobs, devs: list[Device], total, sharded) -> dict:
    """DDP when one replica fits a GPU; else FSDP when its shards fit (every GPU computes at once); else the layers
    split over the GPUs (they compute one after the other, but the activations divide too). A recipe's
    ``training.strategy`` other than auto is kept, and the verdict says whether it fits."""
    cpu, n, smallest = devs[0].kind == "cpu", len(devs), min(d.limit for d in devs)
    if cpu or n == 1:
        if k.strategy in ("ddp", "fsdp"):
            return {"mode": k.strategy, "shards": 1,
                    "why": f"the recipe asks for {k.strategy.upper()}: the processes `train --processes N` starts "
                           f"(or --nnodes) each hold {'a shard' if k.strategy == 'fsdp' else 'a replica'}"
                           + (" (gloo on the CPU: the same code path as on GPUs)" if cpu else "")}
        return {"mode": "single", "shards": 1, "why": "no NVIDIA GPU: one process trains on the CPU" if cpu else "one GPU"}
    replica, asked = total(k), k.strategy != "auto"
    if k.strategy == "ddp" or (not asked and replica <= smallest):
        return {"mode": "ddp", "shards": 1, "replicas": n,
                "why": ("the recipe asks for DDP: " if asked else
                        f"one replica fits a GPU ({replica / GiB:.1f} GiB of {smallest / GiB:.1f}): ") +
                       f"data parallelism (DDP, one process per GPU) trains {n}x the examples per step with no "
                       "communication of weights, only of the adapter's gradients"}
    if k.strategy == "fsdp" or (not asked and sharded(k) <= smallest):
        offload = " (with CPU offload: the shards in host memory)" if k.cpu_offload else ""
        return {"mode": "fsdp", "shards": n, "replicas": n, "offload": k.cpu_offload,
                "why": ("the recipe asks for FSDP: " if asked else
                        f"one replica needs {replica / GiB:.1f} GiB, more than a GPU allows ({smallest / GiB:.1f}); ")
                       + f"FSDP{offload} shards the 4-bit weights, the adapter and its optimizer states over {n} GPUs "
                       f"({sharded(k) / GiB:.1f} GiB each) and all {n} compute at once, gathering each layer's "
                       "weights as it runs; a layer-by-layer split would leave all but one idle at any time"}
    for shards in range(2, n + 1):
        if total(k, shards) <= smallest or (k.strategy == "split" and shards == n):
            return {"mode": "split", "shards": shards,
                    "why": ("the recipe asks for a split: " if asked else
                            f"one replica needs {replica / GiB:.1f} GiB, more than a GPU allows "
                            f"({smallest / GiB:.1f}), and FSDP's {sharded(k) / GiB:.1f} GiB per GPU (each keeps "
                            "its own activations) does not fit either; ")
                           + f"its layers are split over {shards} GPUs (device_map with per-GPU limits), which run "
                             "one after the other"}
    return {"mode": "split", "shards": n, "why": "even split over every GPU it does not fit"}


def _alternatives(shape, k, devs, kind, shorter_needed, total) -> list[str]:
    smallest = min(d.limit for d in devs)
    need = total(k)
    out = []
    if shorter_needed:
        out.append(f"max_seq_length {shorter_needed} (rerun with --allow-shorter; longer examples are truncated)")
    if k.full:
        adapter = replace(k, full=False, lora_r=16)
        if total(adapter) <= smallest:
            out.append(f"LoRA instead of full fine-tuning (a lora section, r 16): {total(adapter) / GiB:.1f} GiB; full "
                       f"fine-tuning keeps 16 bytes per parameter (fp32 weights, gradients, AdamW's two states)")
    elif k.quant != "nf4":
        q = replace(k, quant="nf4")
        if total(q) <= smallest:
            out.append(f"QLoRA instead of LoRA (quantization.method: nf4): {total(q) / GiB:.1f} GiB")
    for fraction, label in ((0.5, "half"), (0.25, "a quarter")):
        smaller = replace(shape, layers=max(1, int(shape.layers * fraction)))
        if sum(estimate(smaller, k, kind).values()) <= smallest:
            out.append(f"a smaller model: about {label} of this one's {shape.total_params / 1e9:.1f}B parameters fits")
            break
    if kind == "cuda" and len(devs) > 1 and not k.cpu_offload:
        off = replace(k, cpu_offload=True)
        per_gpu = sum(estimate(shape, off, kind, len(devs), fsdp=True).values())
        if per_gpu <= smallest:
            out.append(f"FSDP with CPU offload (training.fsdp_cpu_offload: true): {per_gpu / GiB:.1f} GiB a GPU and "
                       f"{host_estimate(shape, off, len(devs), len(devs)) / GiB:.0f} GiB of host memory; slower steps")
    if kind == "cuda":
        gpus = next((n for n in range(len(devs) + 1, 17) if total(k, n) <= devs[0].limit), None)
        if gpus:
            out.append(f"{gpus} GPUs like these (the model split over them); it needs {need / GiB:.1f} GiB on one")
        out.append(f"a GPU with at least {need / 0.9 / GiB:.0f} GiB")
    else:
        out.append(f"{need / 0.9 / GiB:.0f} GiB of RAM, or an NVIDIA GPU")
    return out


def method_text(k: dict) -> str:
    """What trains, in words: full fine-tuning, or the adapter (LoRA / DoRA and its rank), and DPO if so."""
    what = "full fine-tuning" if k.get("full") else f"{'DoRA' if k.get('dora') else 'LoRA'} r={k['lora_r']}"
    return f"DPO on {what}" if k.get("dpo") else what


def render_text(plan: dict) -> str:
    """A plain-text account: verdict, breakdown per device with bars against the limit, adjustments, strategy."""
    lines = []
    m = plan["model"]
    k = plan["knobs"]
    verdict = {"fits": "FITS", "fits_after_adjustment": "FITS AFTER ADJUSTMENT", "does_not_fit": "DOES NOT FIT"}
    lines.append(f"{m['name']}: {m['parameters'] / 1e9:.2f}B parameters, {m['layers']} layers, hidden {m['hidden']}, "
                 f"vocab {m['vocab']}")
    lines.append(f"on {plan['hardware']}: {verdict[plan['verdict']]} (limit {plan['limit_fraction']:.0%} of each device)")
    lines.append(f"settings: {k['quant']}{' + double quant' if k['double_quant'] and k['quant'] == 'nf4' else ''}, "
                 f"{method_text(k)}, micro-batch {k['micro_batch']} x accumulation {k['grad_accum']} "
                 f"(effective {k['effective_batch']}), sequences {k['seq_len']}, gradient checkpointing "
                 f"{'on' if k['grad_ckpt'] else 'off'}, {k['optimizer']}, {k['compute_dtype']}")
    for d in plan["devices"]:
        lines.append("")
        lines.append(f"{d['device']}: {d['estimate'] / GiB:.2f} GiB of {d['limit'] / GiB:.2f} GiB allowed "
                     f"({d['capacity'] / GiB:.1f} GiB total) {'ok' if d['fits'] else 'TOO MUCH'}")
        scale = max(d["estimate"], d["limit"])
        for part, value in d["breakdown"].items():
            bar = "#" * max(0, round(40 * value / scale)) if scale else ""
            lines.append(f"  {part:<17}{value / GiB:>8.2f} GiB  {bar}")
        lines.append(f"  {'limit':<17}{d['limit'] / GiB:>8.2f} GiB  {'-' * round(40 * d['limit'] / scale)}|")
    if plan.get("choices"):
        lines.append("")
        lines.append("chosen by the plan (the recipe left them to it):")
        lines += [f"  - {c['change']} ({c['why']})" for c in plan["choices"]]
    if plan["adjustments"]:
        lines.append("")
        lines.append("adjustments, in order:")
        lines += [f"  - {a['change']} ({a['why']})" for a in plan["adjustments"]]
    lines.append("")
    lines.append(f"strategy: {plan['strategy']['mode']}: {plan['strategy']['why']}")
    if plan.get("host"):
        h = plan["host"]
        lines.append(f"host memory: {h['estimate'] / GiB:.1f} GiB of {h['capacity'] / GiB:.1f} GiB "
                     f"{'ok' if h['fits'] else 'TOO MUCH'} ({h['why']})")
    if plan.get("duration"):
        d = plan["duration"]
        lines.append(f"time: {duration.text(d['seconds'])} (an estimate: {d['basis']})")
    if plan.get("footprint"):
        lines += footprint_lines(plan["footprint"])
    for c in plan.get("checks", []):
        lines.append(f"warning: {c['message']}")
    if plan.get("would_fit"):
        lines.append("what would fit:")
        lines += [f"  - {w}" for w in plan["would_fit"]]
    return "\n".join(lines)


# Published measured peaks the estimator is compared with (bench/plan_accuracy.py prints the table).
PUBLISHED = [
    {"source": "QLoRA paper (Dettmers et al. 2023), Fig. 6 / sec. 4: LLaMA-7B 4-bit base weights",
     "part": "weights", "model": "llama-7b", "value": 5048 * 10**6,
     "knobs": Knobs(quant="nf4", double_quant=True, compute_dtype="bfloat16", micro_batch=1, seq_len=512)},
    {"source": "QLoRA paper, sec. 4: LLaMA-7B LoRA parameters, 0.2% of the weights in 16-bit (modelled: r=16 on q,k,v)",
     "part": "lora16", "model": "llama-7b", "value": 26 * 10**6,
     "knobs": Knobs(quant="nf4", lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj"))},
    {"source": "QLoRA paper, sec. 4: LoRA input gradients only (no attention; the paper's estimate), LLaMA-7B, batch 1",
     "part": "activations", "model": "llama-7b", "value": 567 * 10**6,
     "knobs": Knobs(quant="nf4", micro_batch=1, seq_len=512, grad_ckpt=False)},
    {"source": "QLoRA paper, sec. 4: the same with gradient checkpointing, per (FLAN v2) sequence",
     "part": "activations", "model": "llama-7b", "value": 18 * 10**6,
     "knobs": Knobs(quant="nf4", micro_batch=1, seq_len=512, grad_ckpt=True)},
    {"source": "torchtune README: Llama 3.1 8B QLoRA, 1x RTX 4090, batch 2, packed 2048",
     "part": "total", "model": "llama-3.1-8b", "value": int(7.4 * GiB),
     "knobs": Knobs(quant="nf4", double_quant=False, lora_r=8, micro_batch=2, seq_len=2048, grad_ckpt=True,
                    lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), lm_head="chunked")},
    {"source": "torchtune README: Llama 3.1 8B LoRA, 1x RTX 4090, batch 2, packed 2048",
     "part": "total", "model": "llama-3.1-8b", "value": int(16.2 * GiB),
     "knobs": Knobs(quant="none", lora_r=8, micro_batch=2, seq_len=2048, grad_ckpt=True,
                    lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), lm_head="chunked")},
    {"source": "Answer.AI fsdp_qlora: Llama-2 7B QLoRA, batch 1, gradient checkpointing, context 512",
     "part": "total", "model": "llama-2-7b", "value": int(4.98 * GiB),
     "knobs": Knobs(quant="nf4", micro_batch=1, seq_len=512, grad_ckpt=True, lm_head="full")},
    {"source": "Answer.AI fsdp_qlora: Llama-2 7B QLoRA, batch 1, gradient checkpointing, context 2048",
     "part": "total", "model": "llama-2-7b", "value": int(5.21 * GiB),
     "knobs": Knobs(quant="nf4", micro_batch=1, seq_len=2048, grad_ckpt=True, lm_head="full")},
]


def plan_recipe(recipe, simulate: str | None = None, model_config: str | Path | None = None,
                limit: float = DEFAULT_LIMIT, allow_shorter: bool = False) -> dict:
    """Plan a recipe on this machine (or a simulated one); recorded in the audit log."""
    from . import hardware
    from .trust import audit

    hw = hardware.detect(simulate)
    near = Path(recipe.source).parent if recipe.source else None
    shape, config_source = load_shape(recipe.base_model, model_config, near)
    plan = make_plan(shape, Knobs.from_recipe(recipe), hw, limit, allow_shorter)
    plan["config"] = config_source
    plan["recipe"] = recipe.source
    plan["recipe_changes"] = recipe_changes(plan)
    train, validation = _split_sizes(recipe)
    plan["checks"] = checks.recipe_checks(recipe, train["records"] if train else None)
    if plan["checks"] and recipe.training.strict_checks:
        where = recipe.source or "the recipe"
        raise InvalidInput(f"{where}: training.strict_checks is on and the recipe breaks {len(plan['checks'])} of "
                           "the guides' rules: " + "; ".join(c["message"] for c in plan["checks"]) +
                           "; fix them, or set training.strict_checks: false to have them as warnings.")
    emulated = next((a for a in plan["adjustments"] if a.get("key") == "compute_dtype"), None)
    if emulated and recipe.training.strict_checks:
        raise InvalidInput(f"{recipe.source or 'the recipe'}: quantization.compute_dtype is bfloat16 but "
                           f"{emulated['why'].split(';')[0]}; training.strict_checks is on, so the plan does not change "
                           "it: set compute_dtype: auto (or float32), or strict_checks: false to let the plan adjust it.")
    knobs = Knobs(**{k: v for k, v in plan["knobs"].items() if k != "effective_batch"})
    replicas = int(plan["strategy"].get("replicas") or 1) if plan["strategy"]["mode"] in ("ddp", "fsdp") else 1
    try:
        config = json.loads(Path(config_source).read_text())
    except (OSError, ValueError):
        config = None
    plan["duration"] = duration.estimate(shape, knobs, hw, recipe, train, validation, replicas, config)
    from .models import saved_dtype

    plan["footprint"] = footprint(shape, knobs, recipe, plan["duration"].get("steps"), hw,
                                  plan["strategy"]["mode"] == "fsdp", saved_dtype(Path(config_source)),
                                  _tokenizer_bytes(config_source),
                                  limit)
    audit.record("plan", {"model": recipe.base_model},
                 {"recipe": recipe.name, "hardware": plan["hardware"], "verdict": plan["verdict"],
                  "estimate_gib": round(max(d["estimate"] for d in plan["devices"]) / GiB, 2),
                  "changes": plan["recipe_changes"]})
    return plan


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "chat_template*")


def _tokenizer_bytes(config_path: str) -> int:
    """The size of the tokenizer's files beside the model's config (none when planning from a config alone)."""
    folder = Path(config_path).parent
    return sum(f.stat().st_size for pattern in TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file())


def _split_sizes(recipe) -> tuple[dict | None, dict | None]:
    """{records, bytes} of the training examples (a mix's whole, as data.mixed_train makes it) and of the held-out
    split, read without decrypting; (None, None) when a dataset is not here yet."""
    from . import data
    from .errors import NotFound

    try:
        (first, weight), *_ = recipe.mix()
        sizes = data.stats(first)
    except NotFound:
        return None, None
    train = {k: round(v / weight) for k, v in sizes["train"].items()}
    return train, sizes["validation"]


def fitted(recipe, allow_shorter: bool = False):
    """Plan ``recipe`` on this machine before training: (the recipe with the plan's adjustments, the plan), or
    InvalidInput with the refusal when it does not fit. What `appliance train`, the demo and the TUI start from."""
    plan = plan_recipe(recipe, allow_shorter=allow_shorter)
    if plan["verdict"] == "does_not_fit":
        raise InvalidInput(refusal(plan))
    return adjusted(recipe, plan), plan


def adjusted(recipe, plan: dict):
    """The recipe with the plan's adjustments applied (validated like any recipe)."""
    from .recipes import _set_dotted, from_dict

    if not plan["recipe_changes"]:
        return recipe
    raw = recipe.model_dump(mode="json")
    for dotted, value in plan["recipe_changes"].items():
        _set_dotted(raw, dotted, value)
    new = from_dict(raw, source=Path(recipe.source) if recipe.source else None)
    return new


def refusal(plan: dict) -> str:
    """One sentence for a plan that does not fit: how much, where, and what would."""
    worst = max(plan["devices"], key=lambda d: d["estimate"] - d["limit"])
    would = "; ".join(plan.get("would_fit", [])) or "a machine with more memory"
    return (f"this run does not fit: it needs {worst['estimate'] / GiB:.1f} GiB on {worst['device']} "
            f"but {worst['limit'] / GiB:.1f} GiB are allowed, even after every safe adjustment; what would fit: "
            f"{would} (`appliance plan` shows the breakdown).")
