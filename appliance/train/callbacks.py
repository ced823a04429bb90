"""What watches a training run from inside the Trainer: events, the stop, memory, out-of-memory recovery.

Contract: ``event_callback(emit, run, watch)`` is the TrainerCallback that turns the Trainer's logs into events
(progress with loss, learning rate, tokens/s and memory; metrics; checkpoint markers written only when a
checkpoint is whole) and ends the loop at a step boundary with a checkpoint when a stop was requested.
``MemoryWatch`` samples RSS, system RAM and, on CUDA, torch's and NVML's figures at most once a second and warns
once at the soft threshold. ``is_oom`` / ``recover`` turn an out-of-memory error into a halved micro-batch and a
doubled accumulation (the same effective batch), kept in ``overrides.json`` and recorded; ``inject_oom`` is the
test hook (``APPLIANCE_FAULT=oom_at_step:N``).
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path

from .. import events as ev
from ..trust import audit
from ..errors import StageFailed
from ..workspace import read_json
from . import proc

DEFAULT_WARN_FRACTION = 0.90


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
    from ..runs import last_checkpoint, record_batch, step_of

    if micro <= 1:
        raise StageFailed(f"out of memory at step {at_step} with micro-batch 1 ({error}); nothing is left to halve: "
                          "shorten training.max_seq_length, turn on training.gradient_checkpointing, or see what fits "
                          "with `appliance plan`.")
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    new_micro, new_accum = micro // factor, accum * factor
    checkpoint = last_checkpoint(run.name)
    record = {"at_step": at_step, "resumed_from": checkpoint.name if checkpoint else None,
              "micro_batch": [micro, new_micro], "gradient_accumulation": [accum, new_accum], "error": error}
    record_batch(run.name, new_micro, new_accum, record)
    since = step_of(checkpoint) + 1 if checkpoint else 1
    lost = f"steps {since}-{at_step} are trained again" if since < at_step else f"step {at_step} is trained again"
    emit(ev.Event("warning", proc.STAGE, f"out of memory at step {at_step} with micro-batch {micro}; continuing from "
                  f"{checkpoint.name if checkpoint else 'the start'} with micro-batch {new_micro} and gradient "
                  f"accumulation {new_accum} (the same effective batch, {micro * accum}); {lost}",
                  {"oom_recovery": record}))
    audit.record("train.oom_recovery", {"run": run.name},
                 {"at_step": at_step, "resumed_from": record["resumed_from"], "micro_batch": [micro, new_micro],
                  "gradient_accumulation": [accum, new_accum], "error": error[:200]})
    return new_micro, new_accum, checkpoint


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def inject_oom(run: Path, model) -> None:
    """Test-only: ``APPLIANCE_FAULT=oom_at_step:N`` raises torch's real OutOfMemoryError in the forward pass of step
    N, once per run (not again after a recovery is on record)."""
    fault = os.environ.get("APPLIANCE_FAULT", "")
    if not fault.startswith("oom_at_step:") or proc.world()[0] != 0:
        return
    from ..runs import overrides

    if overrides(run.name).get("oom_recoveries"):
        return
    at = int(fault.split(":", 1)[1])

    def hook(module, inputs):
        import torch

        if proc.progress["step"] + 1 == at and proc.progress.get("training"):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step {at} "
                                              "by APPLIANCE_FAULT)")

    model.register_forward_pre_hook(hook)


# -- memory ----------------------------------------------------------------------------------------------------------


def split_memory(run: Path) -> dict | None:
    """{gpu index: bytes} when the run's plan chose to split the model over GPUs, else None."""
    plan = run / "plan.json"
    if not plan.is_file():
        return None
    p = read_json(plan)
    if p.get("strategy", {}).get("mode") != "split":
        return None
    shards = int(p["strategy"].get("shards", 1))
    return {i: int(d["limit"]) for i, d in enumerate(p["devices"][:shards])}


def warn_fraction(run: Path) -> float:
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


class MemoryWatch:
    """Samples memory (at most once a second) and warns once when use crosses the soft threshold."""

    def __init__(self, emit: ev.Emit, run: Path, cuda: bool):
        import psutil

        self.emit, self.cuda, self.proc = emit, cuda, psutil.Process()
        self.fraction = warn_fraction(run)
        self.warned = False
        self.last: dict = {}
        self.sampled_at = 0.0

    def sample(self, step: int, force: bool = False) -> dict:
        now = time.monotonic()
        if not force and self.last and now - self.sampled_at < 1.0:
            return self.last
        from .. import hardware

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
            gpu = next((g for g in live["gpus"] if g["index"] == nvml_index(dev)), None)
            if gpu and gpu.get("memory_total"):
                m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"] = gpu["memory_used"], gpu["memory_total"]
            else:  # no NVML: the driver's own count, which also includes other processes
                free, total_b = torch.cuda.mem_get_info(dev)
                m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"] = total_b - free, total_b
            used, total, where = m["gpu_memory_used_bytes"], m["gpu_memory_total_bytes"], f"GPU {dev}"
        self.last, self.sampled_at = m, now
        if not self.warned and total and used / total >= self.fraction:
            self.warned = True
            self.emit(ev.Event("warning", proc.STAGE,
                               f"memory: {used / total:.0%} of {where} in use at step {step} ({used / 2**30:.1f} of "
                               f"{total / 2**30:.1f} GiB; this process {m['rss_bytes'] / 2**30:.2f} GiB RSS), past the "
                               f"{self.fraction:.0%} warning threshold; an out-of-memory error would halve the "
                               "micro-batch and continue from the last checkpoint",
                               {"memory": m, "used_fraction": round(used / total, 4), "threshold": self.fraction,
                                "device": where, "step": step}))
        return m


def nvml_index(cuda_index: int) -> int:
    """NVML numbers every GPU; CUDA only the visible ones, in CUDA_VISIBLE_DEVICES order (when given as numbers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    try:
        return int(visible[cuda_index])
    except (ValueError, IndexError):
        return cuda_index


# -- events ----------------------------------------------------------------------------------------------------------


def event_callback(emit: ev.Emit, run: Path, watch: MemoryWatch, patience: int = 3, early_stopping: bool = False):
    """A TrainerCallback that turns the Trainer's logs into events (built lazily: transformers is heavy).

    It also keeps the golden checkpoint: an evaluation with a new lowest validation loss is saved at once (the
    Trainer records it as ``best_model_checkpoint``), whatever ``save_steps`` says; and it warns once when the
    validation loss has risen ``patience`` evaluations in a row while the training loss fell (overfitting)."""
    from transformers import TrainerCallback

    from ..runs import COMPLETE

    # fault injection for tests: "hang_after_checkpoint:4", "wait_for_stop_at_step:3"
    fault = os.environ.get("APPLIANCE_FAULT", "")
    rank, world = proc.world()
    writer = proc.writes()

    class Events(TrainerCallback):
        def __init__(self):
            self.step_started = 0.0
            self.busy = 0.0  # seconds spent in training steps since the last log (evaluation excluded)
            self.last_tokens = None

        def on_train_begin(self, args, state, control, **kw):
            proc.progress["step"] = state.global_step
            self.fit = Overfitting(patience, state.log_history)  # a resumed run remembers its earlier evaluations
            emit(ev.Event("progress", proc.STAGE, "", {"step": state.global_step, "max_steps": state.max_steps}))

        def on_step_begin(self, args, state, control, **kw):
            proc.progress["step"], proc.progress["training"] = state.global_step, True
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            proc.progress["step"], proc.progress["training"] = state.global_step, False
            self.busy += time.perf_counter() - self.step_started
            if writer:
                watch.sample(state.global_step)
            if fault == f"wait_for_stop_at_step:{state.global_step}":
                while not proc.stop_requested:  # test-only: the stop lands at a known step, not in a race
                    time.sleep(0.05)
            stop = proc.stop_requested
            if world > 1:  # every rank must stop (and save) at the same step, or the others wait forever
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1 if stop else 0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step >= state.max_steps and state.global_step % args.eval_steps:
                control.should_evaluate = True  # the final adapter is evaluated too: "best" then covers it

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return
            self.fit.train_loss(logs["loss"])
            tokens = logs.get("num_tokens")  # TRL's running count of non-padding tokens
            rate = None
            if tokens is not None and self.last_tokens is not None and tokens > self.last_tokens and self.busy > 0:
                rate = (tokens - self.last_tokens) / self.busy
            self.busy, self.last_tokens = 0.0, tokens
            d = {
                "step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"), "tokens_per_s": rate, "tokens": tokens,
                # DPO: how far the chosen answers' implicit reward is above the rejected ones', and how often
                "reward_margin": logs.get("rewards/margins"), "reward_accuracy": logs.get("rewards/accuracies"),
            }
            if writer:
                d.update(watch.sample(state.global_step))
            emit(ev.Event("progress", proc.STAGE, "", {k: v for k, v in d.items() if v is not None and not _nan(v)}))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not metrics or "eval_loss" not in metrics:
                return
            loss = metrics["eval_loss"]
            # The Trainer updates best_metric after this call: a loss below it is the new best. Save it now, so
            # the best evaluation always has a checkpoint to merge.
            best = state.best_metric is None or loss < state.best_metric
            if best:
                control.should_save = True
            rewards = {"eval_reward_margin": metrics.get("eval_rewards/margins"),
                       "eval_reward_accuracy": metrics.get("eval_rewards/accuracies")}
            emit(ev.Event("metric", proc.STAGE, "", {"step": state.global_step, "eval_loss": loss, "best": best,
                                                     **{k: v for k, v in rewards.items() if v is not None}}))
            warning = self.fit.eval_loss(state.global_step, loss)
            if warning and writer:
                best_at = state.best_global_step if not best else state.global_step
                action = ("early stopping will stop the run" if early_stopping else
                          "set training.early_stopping to stop such runs, or train fewer steps")
                emit(ev.Event("warning", proc.STAGE, f"overfitting: {warning}; the best checkpoint so far is "
                              f"checkpoint-{best_at}, which merge and export use by default; {action}",
                              {"overfitting": {**self.fit.evidence, "best_step": best_at}}))

        def on_save(self, args, state, control, **kw):
            if world > 1:  # every rank has written its part (its RNG state) before the checkpoint counts
                import torch.distributed as dist

                dist.barrier()
            if not writer:  # the first rank of each machine marks its own copy
                return
            ckpt = run / "checkpoints" / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text(f"{state.global_step}\n")
                emit(ev.Event("metric", proc.STAGE, "", {"step": state.global_step, "checkpoint": ckpt.name}))
                if fault == f"hang_after_checkpoint:{state.global_step}":
                    time.sleep(3600)  # test-only: a worker stuck here is killed with SIGKILL by the test

    return Events()


class Overfitting:
    """Validation loss rising ``patience`` evaluations in a row while the mean training loss between them falls:
    the model is learning the training split, not the task. Says so once (``eval_loss`` returns the sentence)."""

    def __init__(self, patience: int, history: list[dict] | None = None):
        self.patience, self.evals, self.window, self.warned = patience, [], [], False
        self.evidence: dict = {}
        for h in history or []:  # Trainer's log_history: training logs and evaluations in order
            if "loss" in h:
                self.train_loss(h["loss"])
            if "eval_loss" in h:
                self.eval_loss(h.get("step", 0), h["eval_loss"], quiet=True)

    def train_loss(self, loss: float) -> None:
        if not _nan(loss):
            self.window.append(float(loss))

    def eval_loss(self, step: int, loss: float, quiet: bool = False) -> str | None:
        """Record an evaluation: (step, validation loss, mean training loss since the previous one)."""
        train = sum(self.window) / len(self.window) if self.window else None
        self.window = []
        self.evals.append((step, float(loss), train))
        recent = self.evals[-(self.patience + 1):]
        if self.warned or len(recent) <= self.patience:
            return None
        rising = all(b[1] > a[1] for a, b in zip(recent, recent[1:]))
        trains = [r[2] for r in recent if r[2] is not None]
        falling = len(trains) >= 2 and trains[-1] < trains[0]
        if not (rising and falling):
            return None
        self.warned = True
        (s0, v0, _), (s1, v1, _) = recent[0], recent[-1]
        self.evidence = {"from_step": s0, "to_step": s1, "eval_loss": [v0, v1], "train_loss": [trains[0], trains[-1]],
                         "evaluations": self.patience}
        if quiet:
            return None
        return (f"validation loss rose for {self.patience} evaluations in a row ({v0:.4f} at step {s0} to {v1:.4f} "
                f"at step {s1}) while training loss fell ({trains[0]:.4f} to {trains[-1]:.4f})")


def _nan(v) -> bool:
    return isinstance(v, float) and (math.isnan(v) or math.isinf(v))


def peak_rss() -> int:
    """This process's peak resident memory (what the planner's CPU estimate is checked against)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
