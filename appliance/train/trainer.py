"""Set-up and fit: from a recipe to a trained adapter, in this process (one rank, or the only one).

Contract: ``train(run, recipe, resume, emit)`` tokenizes the vault dataset (in memory), loads the base model
(NF4 with double quantization for QLoRA, or 16-bit), wraps it in PEFT LoRA, fits it with TRL's SFTTrainer (loss
on assistant tokens only, the tokenizer's own chat template), recovers from out-of-memory errors by halving the
micro-batch, and on rank 0 writes ``summary.json``, the adapter and their signed manifests and the
``train.finish`` audit entry. It prints nothing; everything goes to ``emit``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import data, hardware
from .. import events as ev
from ..chat_format import encode, with_system
from ..errors import StageFailed
from ..recipes import Recipe
from ..trust import audit
from ..workspace import read_json, write_json
from . import model as model_builder
from . import proc
from .callbacks import (MemoryWatch, describe_oom, event_callback, inject_oom, is_oom, nvml_index, peak_rss,
                        recover, release_memory, split_memory)


def train(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit, checkpoint: str | None = "last") -> None:
    """``checkpoint`` (on a resume): "last" (the newest complete one), a checkpoint's name (what the nodes of a
    run across machines agreed on), or None (from the start)."""
    from ..models import model_dir, saved_dtype
    from ..runs import batch_settings, last_checkpoint

    rank, world = proc.world()
    t = recipe.training
    threads = t.threads or os.cpu_count() or 1
    if world > 1:
        threads = max(1, threads // proc.local_world())  # the ranks on this machine share its cores
    import torch

    torch.set_num_threads(threads)
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()  # keep tokenized dataset text in memory, never in an on-disk cache
    base = model_dir(recipe.base_model)
    cuda = torch.cuda.is_available()
    local = proc.local_world()
    if cuda and world > 1 and local > torch.cuda.device_count():
        raise StageFailed(f"{local} data-parallel processes need {local} GPUs but {torch.cuda.device_count()} are "
                          "visible; start the run with fewer processes.")
    where = "cuda" if cuda else "cpu"
    backend = "NCCL" if cuda else "gloo"
    nodes = world // local
    fsdp = sharded(run, recipe)  # decided once per run: the plan's (or the recipe's) strategy
    layout = "FSDP" if fsdp else "data-parallel"
    parallel = (f", {world} {layout} processes on {nodes} machines ({backend} on "
                f"{os.environ.get('GLOO_SOCKET_IFNAME', '?')})" if nodes > 1 else
                f", {world} {layout} processes ({backend} on loopback)" if world > 1 else "")
    emit(ev.Event("stage", proc.STAGE, f"{'resuming' if resume else 'starting'} on {where} with {threads} threads"
                  f"{' per process' if world > 1 else ''}{parallel}",
                  {"resume": resume, "device": where, "processes": world, "nodes": nodes,
                   "fsdp": layout == "FSDP"}))

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding with the end-of-turn token would blur where a turn ends; pad with another special token.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.bos_token

    mix = recipe.mix()
    mixed, shares = ([], [{"dataset": mix[0][0].name, "weight": 1.0}]) if recipe.method == "dpo" else \
        data.mixed_train(mix, recipe.seed)
    if len(mix) > 1:
        emit(ev.Event("stage", proc.STAGE, "mixing " + ", ".join(
            f"{m['examples']} examples of {m['dataset']} ({m['weight']:.0%})" for m in shares) +
            f"; validation on {shares[0]['dataset']}", {"mix": shares}))

    def tokenized(split: str):
        records = mixed if split == "train" else data.load_split(recipe.dataset_path(), split)
        rows = [encode(tokenizer, with_system(r["messages"], recipe.system_prompt), t.max_seq_length)
                for r in records]
        kept = [r for r in rows if any(r["assistant_masks"])]
        if len(kept) < len(rows):
            emit(ev.Event("warning", proc.STAGE, f"{len(rows) - len(kept)} {split} examples have no assistant tokens "
                          f"within max_seq_length={t.max_seq_length} and were skipped"))
        return datasets.Dataset.from_list(kept)

    def pairs(split: str):
        """Conversational pairs for TRL's DPO trainer, which renders them with the tokenizer's chat template."""
        return datasets.Dataset.from_list([
            {"prompt": with_system(r["prompt"], recipe.system_prompt),
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in data.load_pairs(recipe.dataset_path(), split)])

    load = pairs if recipe.method == "dpo" else tokenized
    train_ds, eval_ds = load("train"), load("validation")
    micro, accum = batch_settings(run.name, recipe)  # the recipe's, or smaller after an out-of-memory recovery

    if not resume or checkpoint is None:
        checkpoint = None
    elif checkpoint == "last":
        checkpoint = last_checkpoint(run.name)
    else:
        checkpoint = run / "checkpoints" / checkpoint
    if resume:
        emit(ev.Event("stage", proc.STAGE, f"resuming from {checkpoint.name if checkpoint else 'the start (no complete checkpoint)'}",
                      {"checkpoint": checkpoint.name if checkpoint else None}))
    watch = MemoryWatch(emit, run, cuda)
    started = time.time()
    while True:
        error = None
        try:
            trainer, result = _fit(run, recipe, base, tokenizer, train_ds, eval_ds, micro, accum, checkpoint, emit,
                                   watch, cuda, fsdp)
            break
        except Exception as e:
            if world > 1 or not is_oom(e):
                raise  # a rank reports an out-of-memory error to its supervisor, which restarts every rank
            error = describe_oom(e)
        # Out here the exception, its traceback and the frames holding the model, the optimizer and the
        # activations are gone: collect them and give the memory back before building everything again.
        release_memory()
        micro, accum, checkpoint = recover(run, emit, error, proc.progress["step"] + 1, micro, accum)
    if proc.stop_requested:
        emit(ev.Event("warning", proc.STAGE, f"stopped on request at step {trainer.state.global_step} with a checkpoint; "
                      "`appliance runs resume` continues from it", {"step": trainer.state.global_step}))
        return
    whole = trained_state(trainer.model) if fsdp else None  # every rank gathers its shards
    if not proc.writes():
        return  # the first rank of each machine writes the summary, the adapter and their manifests

    from ..runs import overrides

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    state = trainer.state
    best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
    stopper = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EarlyStoppingCallback"), None)
    early = bool(stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience)
    if early:
        emit(ev.Event("stage", proc.STAGE, f"early stopping at step {state.global_step} of {state.max_steps}: the "
                      f"validation loss did not improve by more than {t.early_stopping.min_delta} for "
                      f"{t.early_stopping.patience} evaluations; the best is {best} (validation loss "
                      f"{state.best_metric:.4f})", {"early_stopped": {"step": state.global_step, "best": best}}))
    summary = {
        "steps": trainer.state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(state.epoch or 0.0, 4),
        "best_checkpoint": best,  # the lowest validation loss: what merge, export and bundle take by default
        "best_eval_loss": state.best_metric,
        "early_stopped": early,
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
        "nodes": nodes,
        "strategy": "fsdp" if whole is not None else "ddp" if world > 1 else "split" if cuda and split_memory(run)
                    else "single",
        "effective_batch": micro * accum * world,
        "oom_recoveries": overrides(run.name).get("oom_recoveries", []),
        "mix": shares,
        "peak_rss_bytes": peak_rss(),
        **(cuda_peaks() if cuda else {}),
    }
    write_json(run / "summary.json", summary)
    # The run's own manifest covers its recipe and outcome (its folder also holds live files: events,
    # checkpoints); the adapter's names the run, so the lineage reads adapter -> run -> dataset + base model.
    from ..trust import manifest
    from ..workspace import staging

    dataset = recipe.dataset_path()
    files = ["recipe.json", "summary.json"] + (["overrides.json"] if (run / "overrides.json").is_file() else [])
    # Every dataset of a mix is a parent: "dataset" (the domain data), then "dataset.2", "dataset.3"...
    parents = {("dataset" if i == 0 else f"dataset.{i + 1}"): path.name if data.is_encrypted(path)
               else str(path.resolve()) for i, (path, _) in enumerate(mix)}
    if recipe.method == "dpo" and recipe.dpo.from_run:
        parents["sft_run"] = recipe.dpo.from_run  # the lineage goes on through the SFT run to its data
    manifest.write(run, "run", run.name, files=files, parents={**parents, "base_model": recipe.base_model},
                   recipe_sha256=recipe.digest(), steps=summary["steps"], final_loss=summary["final_loss"],
                   hardware=hardware.summary())
    full = recipe.lora is None  # full fine-tuning: the weights themselves, in the base's dtype, not an adapter
    with staging(run / ("full" if full else "adapter")) as tmp:
        save_trained(trainer.model, tmp, full, whole, saved_dtype(base / "config.json"))
        tokenizer.save_pretrained(str(tmp))
        manifest.write(tmp, "full-model" if full else "adapter", f"{run.name}/{'full' if full else 'adapter'}",
                       parents={"run": run.name, "base_model": recipe.base_model}, recipe_sha256=recipe.digest(),
                       hardware=hardware.summary())
    sign_checkpoints(run, recipe)
    audit.record("train.finish", {"run": run.name, "dataset": dataset.name, "base_model": recipe.base_model},
                 {"steps": summary["steps"], "final_loss": summary["final_loss"], "resumed": resume,
                  "oom_recoveries": len(summary["oom_recoveries"]), "processes": world,
                  "nodes": nodes})
    best_text = f"; best {best} (validation loss {state.best_metric:.4f})" if best else ""
    emit(ev.Event("finished", proc.STAGE, f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}"
                  f"{best_text}", summary))


# What a checkpoint holds to resume training, and is not part of the adapter it can be merged as (under FSDP: the
# sharded trained weights and optimizer, one folder each, in torch.distributed.checkpoint's format; transformers
# passes accelerate's adapter_only for a PEFT model, so the frozen 4-bit weights are not in them: test_fsdp).
_TRAINER_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "rng_state", "optimizer_",
                 "pytorch_model_fsdp_")


def sharded(run: Path, recipe: Recipe) -> bool:
    """Does this run train with FSDP: the recipe's training.strategy, or with auto the plan's choice, and more
    than one process to shard over."""
    mode = recipe.training.strategy
    if mode == "auto" and (run / "plan.json").is_file():
        mode = (read_json(run / "plan.json").get("strategy") or {}).get("mode")
    return mode == "fsdp" and proc.world()[1] > 1


def trained_state(model) -> dict:
    """The trained weights whole, on the CPU: an FSDP rank holds one shard of each (a DTensor), so every rank
    calls this (each ``full_tensor`` is an all-gather) and the writer saves the result. Only what trains: the
    adapter (or every weight under full fine-tuning), never the frozen 4-bit base."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def save_trained(model, folder: Path, full: bool, whole: dict | None, dtype: str) -> None:
    """The adapter (PEFT's files; not DPO's frozen reference copy "ref"), or under full fine-tuning the weights in
    the base's dtype. ``whole``: the gathered weights of an FSDP run (``trained_state``)."""
    import torch

    if full:
        if whole is None:
            model.to(getattr(torch, dtype)).save_pretrained(str(folder), safe_serialization=True)
        else:
            model.save_pretrained(str(folder), state_dict={k: v.to(getattr(torch, dtype)) for k, v in whole.items()},
                                  safe_serialization=True)
    else:
        model.save_pretrained(str(folder), selected_adapters=["default"],
                              **({"state_dict": whole} if whole is not None else {}))


def sign_checkpoints(run: Path, recipe: Recipe) -> None:
    """Give every complete checkpoint a signed manifest of its adapter files (kind ``checkpoint``), so that
    ``merge --checkpoint best|STEP`` has a lineage as the final adapter does: checkpoint -> run -> dataset."""
    from ..runs import COMPLETE, checkpoints, step_of
    from ..trust import manifest

    for ckpt in checkpoints(run.name):
        files = [f for f in manifest.files_in(ckpt) if f != COMPLETE and not f.startswith(_TRAINER_ONLY)]
        manifest.write(ckpt, "checkpoint", f"{run.name}/checkpoints/{ckpt.name}", files=files,
                       parents={"run": run.name, "base_model": recipe.base_model}, recipe_sha256=recipe.digest(),
                       step=step_of(ckpt), hardware=hardware.summary())


def cuda_peaks() -> dict:
    """What the planner is checked against on a GPU: the allocator's peaks, and the process's memory outside its
    allocator (CUDA context, cuBLAS workspaces, kernels), which NVML's per-process figure minus the allocator's
    reservation gives. Out-of-memory is decided on reserved + context."""
    import torch

    out = {"peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(),
           "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved()}
    used = hardware.process_gpu_memory(nvml_index(torch.cuda.current_device()), os.getpid())
    if used:  # NVML missing or not answering per process (containers): the figure is left out
        out["cuda_context_bytes"] = max(0, used - torch.cuda.memory_reserved())
    return out


def linear_4bit(model) -> int:
    """How many layers hold 4-bit weights: bitsandbytes' Params4bit with a quantization state (a LoRA wrapper,
    which exposes its base layer's weight, is not counted twice)."""
    return sum(1 for m in model.modules()
               if not hasattr(m, "base_layer") and type(getattr(m, "weight", None)).__name__ == "Params4bit"
               and getattr(m.weight, "quant_state", None) is not None)


def _fit(run: Path, recipe: Recipe, base: Path, tokenizer, train_ds, eval_ds, micro: int, accum: int, checkpoint,
         emit: ev.Emit, watch: "MemoryWatch", cuda: bool, fsdp: bool = False):
    """Build the model and the trainer for this micro-batch and train (from ``checkpoint`` if given).

    Everything heavy lives in this frame, so an exception leaving it leaves nothing behind once handled."""
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    rank, world = proc.world()
    t = recipe.training
    set_seed(recipe.seed)
    dpo, full = recipe.method == "dpo", recipe.lora is None
    packing = t.packing and not dpo  # TRL 1.16's DPO pads its pairs (its padding-free mode is disabled)
    dtype = recipe.quantization.compute_dtype
    if dtype == "auto":  # the plan resolves it; a recipe that reaches training unplanned gets the same rule
        dtype = hardware.compute_dtype(hardware.detect(check_bitsandbytes=False))[0]
    compute_dtype = getattr(torch, dtype)
    adapter = None
    if dpo and recipe.dpo.from_run:
        from ..runs import adapter as run_adapter

        adapter = Path(run_adapter(recipe.dpo.from_run, "best")["path"])
    model, chosen = model_builder.build(base, recipe, dtype, cuda, fsdp=fsdp,
                                        split=split_memory(run) if cuda and world == 1 else None, packing=packing,
                                        adapter=adapter)
    loss = (f"DPO, beta {recipe.dpo.beta}{f' + {recipe.dpo.sft_weight} x SFT on chosen' if recipe.dpo.sft_weight else ''}, "
            f"against {'run ' + recipe.dpo.from_run if recipe.dpo.from_run else 'the base'}"
            if dpo else "TRL chunked LM head" if cuda else "native")
    emit(ev.Event("stage", proc.STAGE, f"{'full fine-tuning, ' if full else ''}attention "
                      f"{chosen['attention']}"
                      f"{', packed bins of ' + str(t.max_seq_length) + ' tokens' if packing else ''}, kernels "
                      f"{chosen['kernels'] or 'transformers'}, loss {loss}, compute {dtype}",
                      {"attention": chosen["attention"], "packing": packing, "kernels": chosen["kernels"],
                       "activation_offloading": t.activation_offloading and cuda, "method": recipe.method,
                       "full": full, "compute_dtype": dtype}))

    distributed = {}
    if world > 1:
        # Every adapter weight takes part in every step: no search for unused parameters. gloo on the CPU.
        distributed = {"ddp_find_unused_parameters": False, **({} if cuda else {"ddp_backend": "gloo"}),
                       # across machines each keeps its own checkpoints (its ranks' RNG states are there too)
                       "save_on_each_node": proc.across_machines(), **(fsdp_args(model, t) if fsdp else {})}
    common = dict(
        output_dir=str(run / "checkpoints"),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.num_epochs or 1.0,  # used only without max_steps
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
        save_total_limit=t.keep_checkpoints,  # the Trainer's rotation keeps the newest and the best
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        metric_for_best_model="eval_loss",  # the Trainer tracks the golden checkpoint for every run
        greater_is_better=False,
        restore_callback_states_from_checkpoint=t.early_stopping is not None,  # the patience count survives a resume
        seed=recipe.seed,
        data_seed=recipe.seed,
        max_length=t.max_seq_length,
        activation_offloading=t.activation_offloading and cuda,  # host memory is where a CPU run keeps them anyway
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and compute_dtype == torch.bfloat16,
        fp16=cuda and compute_dtype == torch.float16,
        dataloader_num_workers=0,
        save_only_model=False,
        **distributed,
    )
    if dpo:
        from trl import DPOConfig, DPOTrainer

        mix = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, recipe.dpo.sft_weight]} \
            if recipe.dpo.sft_weight else {}
        args, cls = DPOConfig(**common, beta=recipe.dpo.beta, **mix), DPOTrainer
    else:
        # best fit decreasing: whole examples in bins, none split across two
        args, cls = SFTConfig(**common, packing=packing, packing_strategy="bfd"), trainer_class(cuda)
    callbacks = [event_callback(emit, run, watch, patience=t.early_stopping.patience if t.early_stopping else 3,
                                early_stopping=t.early_stopping is not None)]
    if fsdp:  # before the event callback, which marks a checkpoint complete
        callbacks.insert(0, adapter_in_checkpoints(full))
        cls = fsdp_trainer(cls, cuda)
    if t.early_stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping.patience,
                                               early_stopping_threshold=t.early_stopping.min_delta))
    trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  callbacks=callbacks)
    # TRL casts QLoRA adapter weights to bf16 when it builds the trainer, but a resume loads them from the
    # checkpoint in fp32, so a resumed run would compute differently from an uninterrupted one. Keep the
    # trainable weights in fp32 from the start (PEFT's own default): tiny in memory, identical across resumes.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    inject_oom(run, trainer.model)
    proc.training_started = True
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, result


def fsdp_args(model, t) -> dict:
    """The Trainer's FSDP settings: FSDP2 (PyTorch's fully_shard), each decoder layer its own unit (the classes
    the model names as not to be split), the state saved sharded (each rank writes its own part of a checkpoint;
    no rank gathers the whole model), CPU offload when the recipe asks."""
    return {"fsdp": ["full_shard", "auto_wrap"] + (["offload"] if t.fsdp_cpu_offload else []),
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": list(model._no_split_modules or []),
                            "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                            "cpu_ram_efficient_loading": os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING") == "true"}}


def fsdp_trainer(cls, cuda: bool):
    """``cls`` as it is on a GPU; on a CPU with accelerate's FSDP path switched on.

    accelerate 1.15 offers FSDP only on accelerators (on a CPU it quietly trains with DDP), while PyTorch's
    fully_shard runs on the CPU with gloo: switching the accelerator's state to FSDP after it is made lets a CPU
    machine (and the tests) run the same sharding, sharded checkpoints and gathering as a GPU machine does."""
    if cuda:
        return cls

    class FSDPOnCPU(cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    return FSDPOnCPU


def adapter_in_checkpoints(full: bool):
    """A callback giving each FSDP checkpoint the adapter's own files beside the sharded state (which only an FSDP
    run can read back), so that merge, export and bundle take any checkpoint of an FSDP run as of any other."""
    from transformers import TrainerCallback

    class AdapterInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            whole = trained_state(model)  # every rank: the shards are gathered
            if proc.writes():
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                save_trained(model, folder, full, whole, "float32")

    return AdapterInCheckpoints()


def trainer_class(cuda: bool):
    """TRL's SFTTrainer; on a CPU with the loss computed from the model's own logits.

    TRL 1.16 always computes the loss through a chunked, fp32 LM head (log-probabilities, entropy and top-1 per
    tile). On a GPU that saves the memory of the full logits; on a CPU it is slower than one matmul and a native
    cross-entropy: 25% of a SmolLM2-135M step here (bench/train_throughput.py measures both)."""
    from trl import SFTTrainer

    if cuda:
        return SFTTrainer

    class NativeLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            mode = "train" if model.training else "eval"
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            # Shift the labels, not the logits: a view of the logits, no copy of tokens x vocab.
            target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            logits = outputs.logits.flatten(0, 1)
            # Per-token losses in the logits' dtype, summed in fp32 (a bf16 sum of thousands of terms would drift).
            loss = torch.nn.functional.cross_entropy(logits, target.flatten(), ignore_index=-100,
                                                     reduction="none").float().sum()
            valid = target != -100
            count = valid.sum()
            loss = loss / (count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).clamp(min=1)
            # As TRL's own: num_items_in_batch counts every rank's tokens, and DDP averages the ranks' gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            gather = self.accelerator.gather_for_metrics
            with torch.no_grad():
                correct = gather(((outputs.logits.argmax(-1) == target) & valid).sum()).sum()
                self._metrics[mode]["mean_token_accuracy"].append((correct / gather(count).sum().clamp(min=1)).item())
            if mode == "train":  # TRL's running count of non-padding tokens over all ranks: what tokens/s is made of
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                self._total_train_tokens += int(gather(local.to(loss.device)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return NativeLossTrainer
