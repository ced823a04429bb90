"""The training child process: ``python -m appliance._train_worker RUN_DIR [--resume] [--processes N]``.

QLoRA (bitsandbytes NF4 with double quantization + PEFT LoRA on all linear
layers) through TRL's SFTTrainer, with the loss on assistant tokens only and
the tokenizer's own chat template. Everything it has to say goes into
``RUN_DIR/events.jsonl``; it prints nothing a user needs. It knows nothing of
who follows it.

Resume: the Trainer restores model, optimizer, scheduler and RNG states from
the newest checkpoint marked COMPLETE and skips the batches already seen, so a
resumed run ends with the same loss as an uninterrupted one.

Memory: every step (at most once a second) it samples the process's RSS, the
system's RAM and, on CUDA, torch's allocated/peak/reserved bytes and NVML's
used/total for its GPU; the figures ride on the progress events, and one
``warning`` event is written the first time use crosses the soft threshold
(``APPLIANCE_MEMORY_WARN_FRACTION``, else the plan's limit, else 90% of RAM or
of the GPU). An out-of-memory error does not end the run: the model and
trainer are torn down, the micro-batch is halved and gradient accumulation
doubled (the same effective batch), and training continues from the last
complete checkpoint; the new batch is kept in ``overrides.json`` so a later
``runs resume`` keeps it, and the recovery is in the events, the summary and
the audit log.

Data parallelism (``--processes N``): this process reads the keys from its
parent's pipe, then starts N ranks with multiprocessing's ``spawn`` and hands
each its keys in memory (through multiprocessing's own pipe, never on disk, in
the environment or on a command line). The ranks meet on 127.0.0.1 (gloo on
the CPU, NCCL on GPUs); rank 0 alone writes events, checkpoint markers, the
summary, manifests and audit entries. This process stays as their supervisor:
it forwards a stop, kills the ranks if it dies (PDEATHSIG), and restarts them
with a halved micro-batch after an out-of-memory error in any of them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import data, hardware
from . import events as ev
from .chat_format import encode, with_system
from .errors import ApplianceError, StageFailed
from .recipes import Recipe
from .trust import audit
from .workspace import read_json, write_json

STAGE = "train"
OOM_EXIT = 75  # a rank's exit status after an out-of-memory error (its supervisor restarts the ranks)
DEFAULT_WARN_FRACTION = 0.90


class _Stopped(Exception):
    pass


# Set by SIGTERM once training has started: the callback then saves a checkpoint at the end of the current
# step and ends the loop, so a stopped run loses nothing and resumes exactly where it stopped.
_stop_requested = False
_training_started = False
_children: list = []  # a supervisor's rank processes (SIGTERM is forwarded to them)
_progress = {"step": 0}  # the global step reached (what an out-of-memory error is reported against)


def main(argv: list[str]) -> int:
    run = Path(argv[0])
    resume = "--resume" in argv[1:]
    processes = int(argv[argv.index("--processes") + 1]) if "--processes" in argv else 1
    handed: dict = {}
    if "--keys-fd" in argv:
        fd = int(argv[argv.index("--keys-fd") + 1])
        with os.fdopen(fd, "rb") as pipe:
            handed = json.loads(pipe.read() or b"{}")
        _use_keys(handed)
    emit = ev.EventLog(run / "events.jsonl")
    info = read_json(run / "run.json")
    info["pid"] = os.getpid()
    write_json(run / "run.json", info)

    def on_term(signum, frame):
        global _stop_requested
        if _children:
            for p in _children:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)  # each rank saves at the same step (they agree every step)
        elif _training_started:
            _stop_requested = True
        else:
            raise _Stopped()

    signal.signal(signal.SIGTERM, on_term)
    try:
        from .runs import load_recipe

        if processes > 1:
            _supervise(run, load_recipe(run.name), resume, emit, processes, handed)
        else:
            train(run, load_recipe(run.name), resume, emit)
        return 0
    except _Stopped:
        emit(ev.Event("warning", STAGE, "stopped on request; `appliance runs resume` continues from the last checkpoint"))
        return 0
    except ApplianceError as e:
        emit(ev.Event("failed", STAGE, str(e)))
        audit.record("train.fail", {"run": run.name}, {"error": str(e)[:300]})
        return 1
    except Exception as e:
        traceback.print_exc()  # to worker.log; tracebacks hold code and shapes, never dataset text
        emit(ev.Event("failed", STAGE, f"{type(e).__name__}: {e}"))
        audit.record("train.fail", {"run": run.name}, {"error": f"{type(e).__name__}"})
        return 1


def _use_keys(handed: dict) -> None:
    from .trust import keys

    keys.use_vault(keys.HandedKeys({k: bytes.fromhex(v) for k, v in handed.get("datasets", {}).items()}))
    if handed.get("signing"):
        from .trust import signing

        signing.use(bytes.fromhex(handed["signing"]))


def _world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless it is one of a supervisor's ranks."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit) -> None:
    from .models import model_dir
    from .runs import batch_settings, last_checkpoint

    rank, world = _world()
    t = recipe.training
    threads = t.threads or os.cpu_count() or 1
    if world > 1:
        threads = max(1, threads // world)  # the ranks share the machine's cores
    import torch

    torch.set_num_threads(threads)
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()  # keep tokenized dataset text in memory, never in an on-disk cache
    base = model_dir(recipe.base_model)
    cuda = torch.cuda.is_available()
    if cuda and world > 1 and rank >= torch.cuda.device_count():
        raise StageFailed(f"{world} data-parallel processes need {world} GPUs but {torch.cuda.device_count()} are "
                          "visible; start the run with fewer processes.")
    where = "cuda" if cuda else "cpu"
    parallel = f", {world} data-parallel processes ({'NCCL' if cuda else 'gloo'} on loopback)" if world > 1 else ""
    emit(ev.Event("stage", STAGE, f"{'resuming' if resume else 'starting'} on {where} with {threads} threads"
                  f"{' per process' if world > 1 else ''}{parallel}",
                  {"resume": resume, "device": where, "processes": world}))

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding with the end-of-turn token would blur where a turn ends; pad with another special token.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.bos_token

    def tokenized(split: str):
        rows = [encode(tokenizer, with_system(r["messages"], recipe.system_prompt), t.max_seq_length)
                for r in data.load_split(recipe.dataset_path(), split)]
        kept = [r for r in rows if any(r["assistant_masks"])]
        if len(kept) < len(rows):
            emit(ev.Event("warning", STAGE, f"{len(rows) - len(kept)} {split} examples have no assistant tokens "
                          f"within max_seq_length={t.max_seq_length} and were skipped"))
        return datasets.Dataset.from_list(kept)

    train_ds, eval_ds = tokenized("train"), tokenized("validation")
    micro, accum = batch_settings(run.name, recipe)  # the recipe's, or smaller after an out-of-memory recovery

    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(run.name)
        emit(ev.Event("stage", STAGE, f"resuming from {checkpoint.name if checkpoint else 'the start (no complete checkpoint)'}",
                      {"checkpoint": checkpoint.name if checkpoint else None}))
    watch = _MemoryWatch(emit, run, cuda)
    started = time.time()
    while True:
        error = None
        try:
            trainer, result = _fit(run, recipe, base, tokenizer, train_ds, eval_ds, micro, accum, checkpoint, emit,
                                   watch, cuda)
            break
        except Exception as e:
            if world > 1 or not is_oom(e):
                raise  # a rank reports an out-of-memory error to its supervisor, which restarts every rank
            error = describe_oom(e)
        # Out here the exception, its traceback and the frames holding the model, the optimizer and the
        # activations are gone: collect them and give the memory back before building everything again.
        _release_memory()
        micro, accum, checkpoint = recover(run, emit, error, _progress["step"] + 1, micro, accum)
    if _stop_requested:
        emit(ev.Event("warning", STAGE, f"stopped on request at step {trainer.state.global_step} with a checkpoint; "
                      "`appliance runs resume` continues from it", {"step": trainer.state.global_step}))
        return
    if rank != 0:
        return  # rank 0 writes the summary, the adapter and their manifests

    from .runs import overrides

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": round(time.time() - started, 2),
        "train_loss_mean": result.training_loss,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "quantization": recipe.quantization.method,
        "linear_4bit": linear_4bit(trainer.model),  # what was really quantized, not what the recipe asked
        "resumed_from": checkpoint.name if checkpoint else None,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "processes": world,
        "effective_batch": micro * accum * world,
        "oom_recoveries": overrides(run.name).get("oom_recoveries", []),
        "peak_rss_bytes": _peak_rss(),
        **({"peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated()} if cuda else {}),
    }
    write_json(run / "summary.json", summary)
    # The run's own manifest covers its recipe and outcome (its folder also holds live files: events,
    # checkpoints); the adapter's names the run, so the lineage reads adapter -> run -> dataset + base model.
    from .trust import manifest
    from .workspace import staging

    dataset = recipe.dataset_path()
    files = ["recipe.json", "summary.json"] + (["overrides.json"] if (run / "overrides.json").is_file() else [])
    manifest.write(run, "run", run.name, files=files,
                   parents={"dataset": dataset.name if data.is_encrypted(dataset) else str(dataset.resolve()),
                            "base_model": recipe.base_model},
                   recipe_sha256=recipe.digest(), steps=summary["steps"], final_loss=summary["final_loss"],
                   hardware=hardware.summary())
    with staging(run / "adapter") as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        manifest.write(tmp, "adapter", f"{run.name}/adapter",
                       parents={"run": run.name, "base_model": recipe.base_model}, recipe_sha256=recipe.digest(),
                       hardware=hardware.summary())
    audit.record("train.finish", {"run": run.name, "dataset": dataset.name, "base_model": recipe.base_model},
                 {"steps": summary["steps"], "final_loss": summary["final_loss"], "resumed": resume,
                  "oom_recoveries": len(summary["oom_recoveries"]), "processes": world})
    emit(ev.Event("finished", STAGE, f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}", summary))


def linear_4bit(model) -> int:
    """How many layers hold 4-bit weights: bitsandbytes' Params4bit with a quantization state (a LoRA wrapper,
    which exposes its base layer's weight, is not counted twice)."""
    return sum(1 for m in model.modules()
               if not hasattr(m, "base_layer") and type(getattr(m, "weight", None)).__name__ == "Params4bit"
               and getattr(m.weight, "quant_state", None) is not None)


def _fit(run: Path, recipe: Recipe, base: Path, tokenizer, train_ds, eval_ds, micro: int, accum: int, checkpoint,
         emit: ev.Emit, watch: "_MemoryWatch", cuda: bool):
    """Build the model and the trainer for this micro-batch and train (from ``checkpoint`` if given).

    Everything heavy lives in this frame, so an exception leaving it leaves nothing behind once handled."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    rank, world = _world()
    t = recipe.training
    set_seed(recipe.seed)
    compute_dtype = getattr(torch, recipe.quantization.compute_dtype)
    load_kwargs: dict = {"dtype": compute_dtype}
    if recipe.quantization.method == "nf4":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute_dtype)
        load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if cuda else "cpu"}
    split = _split_memory(run) if cuda and world == 1 else None
    if split:
        # The plan found that one replica does not fit a GPU: its layers go over several GPUs, each filled up to
        # the plan's per-GPU limit (accelerate places them; the GPUs then run one after the other).
        load_kwargs["device_map"] = "auto"
        load_kwargs["max_memory"] = split
    model = AutoModelForCausalLM.from_pretrained(str(base), **load_kwargs)
    if recipe.quantization.method == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM"))

    distributed = {}
    if world > 1:
        # Every adapter weight takes part in every step: no search for unused parameters. gloo on the CPU.
        distributed = {"ddp_find_unused_parameters": False, **({} if cuda else {"ddp_backend": "gloo"})}
    args = SFTConfig(
        output_dir=str(run / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        seed=recipe.seed,
        data_seed=recipe.seed,
        max_length=t.max_seq_length,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and compute_dtype == torch.bfloat16,
        fp16=cuda and compute_dtype == torch.float16,
        dataloader_num_workers=0,
        save_only_model=False,
        **distributed,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[_Events(emit, run, watch)])
    # TRL casts QLoRA adapter weights to bf16 when it builds the trainer, but a resume loads them from the
    # checkpoint in fp32, so a resumed run would compute differently from an uninterrupted one. Keep the
    # trainable weights in fp32 from the start (PEFT's own default): tiny in memory, identical across resumes.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    _inject_oom(run, trainer.model)
    global _training_started
    _training_started = True
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, result


# -- out-of-memory errors ------------------------------------------------------------------------------------------


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (MemoryError, or torch's "can't allocate memory")."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()[:200])


def describe_oom(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:240]


def recover(run: Path, emit: ev.Emit, error: str, at_step: int, micro: int, accum: int):
    """Record an out-of-memory recovery and return (micro-batch, accumulation, checkpoint) to continue with.

    The micro-batch is divided by its smallest factor (halved when even) and the accumulation multiplied by the
    same, so the effective batch, and with it the examples each optimizer step sees, stay the same."""
    from .runs import last_checkpoint, record_oom_recovery

    if micro <= 1:
        raise StageFailed(f"out of memory at step {at_step} with micro-batch 1 ({error}); nothing is left to halve: "
                          "shorten training.max_seq_length, turn on training.gradient_checkpointing, or see what fits "
                          "with `appliance plan`.")
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    new_micro, new_accum = micro // factor, accum * factor
    checkpoint = last_checkpoint(run.name)
    record = {"at_step": at_step, "resumed_from": checkpoint.name if checkpoint else None,
              "micro_batch": [micro, new_micro], "gradient_accumulation": [accum, new_accum], "error": error}
    record_oom_recovery(run.name, record)
    since = int(checkpoint.name.split("-")[1]) + 1 if checkpoint else 1
    lost = f"steps {since}-{at_step} are trained again" if since < at_step else f"step {at_step} is trained again"
    emit(ev.Event("warning", STAGE, f"out of memory at step {at_step} with micro-batch {micro}; continuing from "
                  f"{checkpoint.name if checkpoint else 'the start'} with micro-batch {new_micro} and gradient "
                  f"accumulation {new_accum} (the same effective batch, {micro * accum}); {lost}",
                  {"oom_recovery": record}))
    audit.record("train.oom_recovery", {"run": run.name},
                 {"at_step": at_step, "resumed_from": record["resumed_from"], "micro_batch": [micro, new_micro],
                  "gradient_accumulation": [accum, new_accum], "error": error[:200]})
    return new_micro, new_accum, checkpoint


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _inject_oom(run: Path, model) -> None:
    """Test-only: ``APPLIANCE_FAULT=oom_at_step:N`` raises torch's real OutOfMemoryError in the forward pass of step
    N, once per run (not again after a recovery is on record)."""
    fault = os.environ.get("APPLIANCE_FAULT", "")
    if not fault.startswith("oom_at_step:") or _world()[0] != 0:
        return
    from .runs import overrides

    if overrides(run.name).get("oom_recoveries"):
        return
    at = int(fault.split(":", 1)[1])

    def hook(module, inputs):
        import torch

        if _progress["step"] + 1 == at and _progress.get("training"):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step {at} "
                                              "by APPLIANCE_FAULT)")

    model.register_forward_pre_hook(hook)


# -- memory ----------------------------------------------------------------------------------------------------------


def _split_memory(run: Path) -> dict | None:
    """{gpu index: bytes} when the run's plan chose to split the model over GPUs, else None."""
    plan = run / "plan.json"
    if not plan.is_file():
        return None
    p = read_json(plan)
    if p.get("strategy", {}).get("mode") != "split":
        return None
    shards = int(p["strategy"].get("shards", 1))
    return {i: int(d["limit"]) for i, d in enumerate(p["devices"][:shards])}


def _warn_fraction(run: Path) -> float:
    raw = os.environ.get("APPLIANCE_MEMORY_WARN_FRACTION")
    if raw:
        return float(raw)
    plan = run / "plan.json"
    if plan.is_file():
        try:
            return float(read_json(plan).get("limit_fraction") or DEFAULT_WARN_FRACTION)
        except (ValueError, TypeError, AttributeError):
            pass
    return DEFAULT_WARN_FRACTION


class _MemoryWatch:
    """Samples memory (at most once a second) and warns once when use crosses the soft threshold."""

    def __init__(self, emit: ev.Emit, run: Path, cuda: bool):
        import psutil

        self.emit, self.cuda, self.proc = emit, cuda, psutil.Process()
        self.fraction = _warn_fraction(run)
        self.warned = False
        self.last: dict = {}
        self.sampled_at = 0.0

    def sample(self, step: int, force: bool = False) -> dict:
        now = time.monotonic()
        if not force and self.last and now - self.sampled_at < 1.0:
            return self.last
        from . import hardware

        live = hardware.sample()
        m = {"rss_bytes": self.proc.memory_info().rss, "ram_used_bytes": live["ram_used"],
             "ram_available_bytes": live["ram_available"], "ram_total_bytes": live["ram_used"] + live["ram_available"]}
        used, total, where = m["ram_used_bytes"], m["ram_total_bytes"], "RAM"
        if self.cuda:
            import torch

            dev = torch.cuda.current_device()
            m.update({"cuda_allocated_bytes": torch.cuda.memory_allocated(dev),
                      "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(dev),
                      "cuda_reserved_bytes": torch.cuda.memory_reserved(dev)})
            gpu = next((g for g in live["gpus"] if g["index"] == _nvml_index(dev)), None)
            if gpu and gpu.get("memory_total"):
                m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"] = gpu["memory_used"], gpu["memory_total"]
            else:  # no NVML: the driver's own count, which also includes other processes
                free, total_b = torch.cuda.mem_get_info(dev)
                m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"] = total_b - free, total_b
            used, total, where = m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"], f"GPU {dev}"
        self.last, self.sampled_at = m, now
        if not self.warned and total and used / total >= self.fraction:
            self.warned = True
            self.emit(ev.Event("warning", STAGE,
                               f"memory: {used / total:.0%} of {where} in use at step {step} ({used / 2**30:.1f} of "
                               f"{total / 2**30:.1f} GiB; this process {m['rss_bytes'] / 2**30:.2f} GiB RSS), past the "
                               f"{self.fraction:.0%} warning threshold; an out-of-memory error would halve the "
                               "micro-batch and continue from the last checkpoint",
                               {"memory": m, "used_fraction": round(used / total, 4), "threshold": self.fraction,
                                "device": where, "step": step}))
        return m


def _nvml_index(cuda_index: int) -> int:
    """NVML numbers every GPU; CUDA only the visible ones, in CUDA_VISIBLE_DEVICES order (when given as numbers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    try:
        return int(visible[cuda_index])
    except (ValueError, IndexError):
        return cuda_index


# -- events ----------------------------------------------------------------------------------------------------------


def _Events(emit: ev.Emit, run: Path, watch: _MemoryWatch):
    """A TrainerCallback that turns the Trainer's logs into events (built lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    from .runs import COMPLETE

    # fault injection for tests: "hang_after_checkpoint:4", "wait_for_stop_at_step:3"
    fault = os.environ.get("APPLIANCE_FAULT", "")
    rank, world = _world()

    class Events(TrainerCallback):
        def __init__(self):
            self.step_started = 0.0
            self.busy = 0.0  # seconds spent in training steps since the last log (evaluation excluded)
            self.last_tokens = None

        def on_train_begin(self, args, state, control, **kw):
            _progress["step"] = state.global_step
            emit(ev.Event("progress", STAGE, "", {"step": state.global_step, "max_steps": state.max_steps}))

        def on_step_begin(self, args, state, control, **kw):
            _progress["step"], _progress["training"] = state.global_step, True
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _progress["step"], _progress["training"] = state.global_step, False
            self.busy += time.perf_counter() - self.step_started
            if rank == 0:
                watch.sample(state.global_step)
            if fault == f"wait_for_stop_at_step:{state.global_step}":
                while not _stop_requested:  # test-only: the stop lands at a known step, not in a race
                    time.sleep(0.05)
            stop = _stop_requested
            if world > 1:  # every rank must stop (and save) at the same step, or the others wait forever
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1 if stop else 0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return
            tokens = logs.get("num_tokens")  # TRL's running count of non-padding tokens
            rate = None
            if tokens is not None and self.last_tokens is not None and tokens > self.last_tokens and self.busy > 0:
                rate = (tokens - self.last_tokens) / self.busy
            self.busy, self.last_tokens = 0.0, tokens
            d = {
                "step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"), "tokens_per_s": rate, "tokens": tokens,
            }
            if rank == 0:
                d.update(watch.sample(state.global_step))
            emit(ev.Event("progress", STAGE, "", {k: v for k, v in d.items() if v is not None and not _nan(v)}))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                emit(ev.Event("metric", STAGE, "", {"step": state.global_step, "eval_loss": metrics["eval_loss"]}))

        def on_save(self, args, state, control, **kw):
            if world > 1:  # every rank has written its part (its RNG state) before the checkpoint counts
                import torch.distributed as dist

                dist.barrier()
            if rank != 0:
                return
            ckpt = run / "checkpoints" / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text(f"{state.global_step}\n")
                emit(ev.Event("metric", STAGE, "", {"step": state.global_step, "checkpoint": ckpt.name}))
                if fault == f"hang_after_checkpoint:{state.global_step}":
                    time.sleep(3600)  # test-only: a worker stuck here is killed with SIGKILL by the test

    return Events()


def _nan(v) -> bool:
    return isinstance(v, float) and (math.isnan(v) or math.isinf(v))


def _peak_rss() -> int:
    """This process's peak resident memory (what the planner's CPU estimate is checked against)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- data parallelism: the supervisor and its ranks ----------------------------------------------------------------


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _supervise(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit, processes: int, handed: dict) -> None:
    """Start ``processes`` ranks, wait for them, and restart them all with a smaller micro-batch after an
    out-of-memory error in any of them (the others are blocked in a collective by then and are killed)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from .runs import batch_settings

    ctx = mp.get_context("spawn")  # a fresh interpreter per rank: no inherited torch or thread state
    micro, accum = batch_settings(run.name, recipe)
    while True:
        port = _free_loopback_port()
        ranks, inboxes = [], []
        for r in range(processes):
            keys = {"datasets": handed.get("datasets", {}), **({"signing": handed["signing"]}
                                                                if r == 0 and handed.get("signing") else {})}
            inbox, outbox = ctx.Pipe(duplex=False)  # what a rank has to say when it fails
            ranks.append(ctx.Process(target=_rank_main, name=f"appliance-rank-{r}",
                                     args=(str(run), resume, r, processes, port, keys, outbox, os.getpid())))
            inboxes.append((inbox, outbox))
        _children[:] = ranks
        for p in ranks:
            p.start()
        for _, outbox in inboxes:
            outbox.close()
        pending = list(ranks)
        failed = None
        while pending and failed is None:
            wait([p.sentinel for p in pending], timeout=1.0)
            for p in list(pending):
                if p.exitcode is not None:
                    pending.remove(p)
                    if p.exitcode != 0:
                        failed = p
        for p in pending:  # the others wait in a collective for the rank that died: end them
            p.kill()
        for p in ranks:
            p.join()
        _children.clear()
        said = []
        for inbox, _ in inboxes:
            try:
                while inbox.poll():
                    said.append(inbox.recv())
            except (EOFError, OSError):
                pass
            inbox.close()
        if failed is None:
            return
        oom = next((m for m in said if m[0] == "oom"), None)
        if oom is not None:
            micro, accum, _ = recover(run, emit, oom[2], oom[1], micro, accum)
            resume = True
            continue
        error = next((m for m in said if m[0] == "error"), None)
        if error is not None:
            raise StageFailed(error[1]) if error[2] else RuntimeError(error[1])
        raise StageFailed(f"training process {ranks.index(failed)} of {processes} ended with status {failed.exitcode}; "
                          "see worker.log in the run's folder; `appliance runs resume` continues from the last "
                          "checkpoint.")


_store = None


def _rendezvous(rank: int, world: int, port: int) -> None:
    """Join the process group before the Trainer would (it then uses this one), with the rendezvous store listening
    on 127.0.0.1 only: c10d's own TCPStore listens on every interface, which the egress guard cannot see (C++)."""
    import datetime
    import socket

    import torch
    import torch.distributed as dist

    global _store
    fd = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(4 * world)
        fd = listener.detach()  # the store's server owns it from here
    _store = dist.TCPStore("127.0.0.1", port, world, rank == 0, datetime.timedelta(minutes=10), master_listen_fd=fd)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", store=_store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))


def _rank_main(run_dir: str, resume: bool, rank: int, world: int, port: int, keys: dict, outbox, parent: int):
    """One data-parallel rank (a spawned process): the keys arrive in memory, the rendezvous is on loopback."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the supervisor
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"})
    _use_keys(keys)
    run = Path(run_dir)
    emit = ev.EventLog(run / "events.jsonl") if rank == 0 else ev.ignore

    def on_term(signum, frame):
        global _stop_requested
        if _training_started:
            _stop_requested = True
        else:
            raise _Stopped()

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        from .runs import load_recipe

        _rendezvous(rank, world, port)
        train(run, load_recipe(run.name), resume, emit)
    except _Stopped:
        if rank == 0:
            emit(ev.Event("warning", STAGE, "stopped on request; `appliance runs resume` continues from the last "
                          "checkpoint"))
    except ApplianceError as e:
        outbox.send(("error", str(e)[:2000], True))
        status = 1
    except Exception as e:
        if is_oom(e):
            outbox.send(("oom", _progress["step"] + 1, f"rank {rank}: {describe_oom(e)}"))
            status = OOM_EXIT
        else:
            traceback.print_exc()
            outbox.send(("error", f"rank {rank}: {type(e).__name__}: {e}"[:2000], False))
            status = 1
    if status == 0:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown: a rank whose peer died must not wait on it at exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
