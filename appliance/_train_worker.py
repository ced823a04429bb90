"""The training child process: ``python -m appliance._train_worker RUN_DIR [--resume]``.

QLoRA (bitsandbytes NF4 with double quantization + PEFT LoRA on all linear
layers) through TRL's SFTTrainer, with the loss on assistant tokens only and
the tokenizer's own chat template. Everything it has to say goes into
``RUN_DIR/events.jsonl``; it prints nothing a user needs. It knows nothing of
who follows it.

Resume: the Trainer restores model, optimizer, scheduler and RNG states from
the newest checkpoint marked COMPLETE and skips the batches already seen, so a
resumed run ends with the same loss as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import audit, data, events as ev
from .chat_format import encode, with_system
from .errors import ApplianceError
from .recipes import Recipe
from .workspace import read_json, write_json

STAGE = "train"


class _Stopped(Exception):
    pass


# Set by SIGTERM once training has started: the callback then saves a checkpoint at the end of the current
# step and ends the loop, so a stopped run loses nothing and resumes exactly where it stopped.
_stop_requested = False
_training_started = False


def main(argv: list[str]) -> int:
    run = Path(argv[0])
    resume = "--resume" in argv[1:]
    if "--keys-fd" in argv:
        fd = int(argv[argv.index("--keys-fd") + 1])
        with os.fdopen(fd, "rb") as pipe:
            handed = json.loads(pipe.read() or b"{}")
        data.use_vault(data.HandedKeys({k: bytes.fromhex(v) for k, v in handed.get("datasets", {}).items()}))
        if handed.get("signing"):
            from . import signing

            signing.use(bytes.fromhex(handed["signing"]))
    emit = ev.EventLog(run / "events.jsonl")
    info = read_json(run / "run.json")
    info["pid"] = os.getpid()
    write_json(run / "run.json", info)

    def on_term(signum, frame):
        global _stop_requested
        if _training_started:
            _stop_requested = True
        else:
            raise _Stopped()

    signal.signal(signal.SIGTERM, on_term)
    try:
        from .runs import load_recipe

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


def train(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit) -> None:
    from .models import model_dir

    t = recipe.training
    threads = t.threads or os.cpu_count() or 1
    import torch

    torch.set_num_threads(threads)
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()  # keep tokenized dataset text in memory, never in an on-disk cache
    set_seed(recipe.seed)
    base = model_dir(recipe.base_model)
    cuda = torch.cuda.is_available()
    emit(ev.Event("stage", STAGE, f"{'resuming' if resume else 'starting'} on {'cuda' if cuda else 'cpu'} "
                  f"with {threads} threads", {"resume": resume, "device": "cuda" if cuda else "cpu"}))

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

    compute_dtype = getattr(torch, recipe.quantization.compute_dtype)
    load_kwargs: dict = {"dtype": compute_dtype}
    if recipe.quantization.method == "nf4":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.quantization.double_quant,
            bnb_4bit_compute_dtype=compute_dtype)
        load_kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(base), **load_kwargs)
    if recipe.quantization.method == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM"))

    args = SFTConfig(
        output_dir=str(run / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
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
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[_Events(emit, run, threads)])
    # TRL casts QLoRA adapter weights to bf16 when it builds the trainer, but a resume loads them from the
    # checkpoint in fp32, so a resumed run would compute differently from an uninterrupted one. Keep the
    # trainable weights in fp32 from the start (PEFT's own default): tiny in memory, identical across resumes.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()

    checkpoint = None
    if resume:
        from .runs import last_checkpoint

        checkpoint = last_checkpoint(run.name)
        emit(ev.Event("stage", STAGE, f"resuming from {checkpoint.name if checkpoint else 'the start (no complete checkpoint)'}",
                      {"checkpoint": checkpoint.name if checkpoint else None}))
    started = time.time()
    global _training_started
    _training_started = True
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if _stop_requested:
        emit(ev.Event("warning", STAGE, f"stopped on request at step {trainer.state.global_step} with a checkpoint; "
                      "`appliance runs resume` continues from it", {"step": trainer.state.global_step}))
        return

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": round(time.time() - started, 2),
        "train_loss_mean": result.training_loss,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "resumed_from": checkpoint.name if checkpoint else None,
    }
    write_json(run / "summary.json", summary)
    # The run's own manifest covers its recipe and outcome (its folder also holds live files: events,
    # checkpoints); the adapter's names the run, so the lineage reads adapter -> run -> dataset + base model.
    from . import manifest
    from .workspace import staging

    dataset = recipe.dataset_path()
    manifest.write(run, "run", run.name, files=["recipe.json", "summary.json"],
                   parents={"dataset": dataset.name if data.is_encrypted(dataset) else str(dataset.resolve()),
                            "base_model": recipe.base_model},
                   recipe_sha256=recipe.digest(), steps=summary["steps"], final_loss=summary["final_loss"])
    with staging(run / "adapter") as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        manifest.write(tmp, "adapter", f"{run.name}/adapter",
                       parents={"run": run.name, "base_model": recipe.base_model}, recipe_sha256=recipe.digest())
    audit.record("train.finish", {"run": run.name, "dataset": dataset.name, "base_model": recipe.base_model},
                 {"steps": summary["steps"], "final_loss": summary["final_loss"], "resumed": resume})
    emit(ev.Event("finished", STAGE, f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}", summary))




def _Events(emit: ev.Emit, run: Path, threads: int):
    """A TrainerCallback that turns the Trainer's logs into events (built lazily: transformers is heavy)."""
    import psutil
    from transformers import TrainerCallback

    from .runs import COMPLETE

    proc = psutil.Process()
    fault = os.environ.get("APPLIANCE_FAULT", "")  # fault injection for tests, e.g. "hang_after_checkpoint:4"

    class Events(TrainerCallback):
        def __init__(self):
            self.step_started = 0.0
            self.busy = 0.0  # seconds spent in training steps since the last log (evaluation excluded)
            self.last_tokens = None

        def on_train_begin(self, args, state, control, **kw):
            emit(ev.Event("progress", STAGE, "", {"step": state.global_step, "max_steps": state.max_steps}))

        def on_step_begin(self, args, state, control, **kw):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.busy += time.perf_counter() - self.step_started
            if _stop_requested:
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
                "rss_bytes": proc.memory_info().rss,
            }
            d.update(_cuda_memory())
            emit(ev.Event("progress", STAGE, "", {k: v for k, v in d.items() if v is not None and not _nan(v)}))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                emit(ev.Event("metric", STAGE, "", {"step": state.global_step, "eval_loss": metrics["eval_loss"]}))

        def on_save(self, args, state, control, **kw):
            ckpt = run / "checkpoints" / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text(f"{state.global_step}\n")
                emit(ev.Event("metric", STAGE, "", {"step": state.global_step, "checkpoint": ckpt.name}))
                if fault == f"hang_after_checkpoint:{state.global_step}":
                    time.sleep(3600)  # test-only: a worker stuck here is killed with SIGKILL by the test

    return Events()


def _cuda_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}


def _nan(v) -> bool:
    return isinstance(v, float) and (math.isnan(v) or math.isinf(v))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
