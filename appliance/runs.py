"""Training runs: create, start, follow, stop and resume.

A run lives in ``runs/<id>/``::

    run.json          id, recipe digest, base model, dataset, pid of the worker
    recipe.json       the resolved recipe the run was started with
    events.jsonl      everything the worker reported, one JSON event a line
    worker.log        the worker's stderr (no dataset text is ever logged)
    checkpoints/      checkpoint-N/ folders; one is usable once it holds COMPLETE
    adapter/          the trained LoRA adapter, with its tokenizer and manifest
    summary.json      final figures (losses, steps, time, tokens/s, out-of-memory recoveries)
    overrides.json    what the worker changed at run time: the smaller micro-batch (and larger gradient
                      accumulation) after an out-of-memory recovery, kept for a later resume

Training runs in a child process (``appliance.train.worker``) started in its
own session: closing the terminal or the TUI does not stop it, and a crash of
the child (an OOM kill, a CUDA fault) never takes the caller down. Its state is
derived from the events and whether the worker is alive, never stored twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from . import events as ev
from .errors import InvalidInput, NotFound
from .recipes import Recipe
from .workspace import folder, new_id, read_json, write_json

COMPLETE = "COMPLETE"


def run_dir(run_id: str) -> Path:
    path = folder("runs") / run_id
    if not (path / "run.json").is_file():
        known = [r["id"] for r in list_runs()][-5:]
        hint = f" (latest: {', '.join(known)})" if known else ""
        raise NotFound(f"no run with id {run_id!r} in {folder('runs')}{hint}; `appliance runs list` shows them.")
    return path


def list_runs() -> list[dict]:
    return [status(p.name) for p in sorted(folder("runs").iterdir()) if (p / "run.json").is_file()]


def create(recipe: Recipe, plan: dict | None = None) -> str:
    """Validate what the recipe points at and make the run's folder (with its memory plan); start nothing. A recipe
    that leaves knobs to the plan (``auto``) is planned here if the caller did not."""
    from . import data
    from .models import model_dir

    if plan is None and recipe.training.auto:
        from .plan import fitted

        recipe, plan = fitted(recipe)

    model_dir(recipe.base_model)
    dataset = recipe.dataset_path()
    for path, _ in recipe.mix():
        for split in ("train", "validation"):  # what training reads: fail here, in the caller, with a clear message
            (data.load_pairs if recipe.method == "dpo" else data.load_split)(path, split)
    if recipe.method == "dpo" and recipe.dpo.from_run:
        recipe = recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"from_run": start_run(recipe)})})
    run_id = new_id(recipe.name)
    path = folder("runs") / run_id
    path.mkdir(parents=True)
    write_json(path / "recipe.json", {**recipe.model_dump(mode="json"), "source": recipe.source})
    write_json(path / "run.json", {"id": run_id, "recipe": recipe.name, "recipe_sha256": recipe.digest(),
                                   "base_model": recipe.base_model, "dataset": str(dataset.resolve())})
    if plan is not None:
        write_json(path / "plan.json", plan)
    return run_id


def start_run(recipe: Recipe) -> str:
    """The finished SFT run a DPO recipe starts from: ``dpo.from_run`` names a run id, or a recipe name (the newest
    finished run of that recipe); it must share the base model and have an adapter."""
    name = recipe.dpo.from_run
    where = f"{recipe.source}: " if recipe.source else ""
    known = list_runs()  # each reads its run's events: once
    runs = [r for r in known if r["id"] == name] or \
        [r for r in reversed(known) if r.get("recipe") == name and r["state"] == "finished"]
    if not runs:
        raise NotFound(f"{where}dpo.from_run {name!r} is neither a run id nor the recipe name of a finished run; "
                       "`appliance runs list` shows them (train the SFT run first).")
    run = runs[0]
    if run["state"] != "finished" or not (Path(run["path"]) / "adapter").is_dir():
        raise InvalidInput(f"{where}dpo.from_run: run {run['id']} is {run['state']}, without a trained adapter; "
                           "finish it first, or start from another run.")
    if run.get("base_model") != recipe.base_model:
        raise InvalidInput(f"{where}dpo.from_run: run {run['id']} trained {run.get('base_model')}, not "
                           f"{recipe.base_model}; start from a run on the same base model.")
    return run["id"]


def start(run_id: str, resume: bool = False, processes: int | None = None, nnodes: int | None = None,
          node_rank: int | None = None, rdzv: str | None = None) -> int:
    """Start the worker for a run in its own session; return its pid.

    ``processes`` > 1 trains with data parallelism: that many ranks (one per GPU; on a CPU, gloo processes
    sharing its cores), each with the recipe's micro-batch, so the effective batch is micro-batch x gradient
    accumulation x processes x machines. Without it: ``APPLIANCE_DDP_PROCESSES``, else what the run was started
    with (a resume keeps it), else the plan's strategy (``ddp``: one replica per GPU), else 1. ``nnodes`` > 1
    makes this machine node ``node_rank`` of a run across machines meeting at ``rdzv`` (HOST:PORT of node 0); a
    resume keeps them unless given."""
    from .cluster import Topology

    path = run_dir(run_id)
    info = read_json(path / "run.json")
    n = _processes(path, info, processes)
    nodes = nnodes if nnodes is not None else int(info.get("nnodes") or 1)
    topology = Topology(n, nodes, node_rank if node_rank is not None else int(info.get("node_rank") or 0) if
                        nodes > 1 else 0, rdzv if rdzv is not None else info.get("rdzv") if nodes > 1 else None)
    topology.check()
    cmd = [sys.executable, "-m", "appliance.train.worker", str(path)]
    if resume:
        cmd.append("--resume")
    cmd += topology.argv()
    # An encrypted dataset's key and the appliance's signing key (for the run's manifests and audit
    # checkpoints) go to the worker through a pipe it inherits: never on disk, never in its environment or
    # command line, and no passphrase needed by a process that has no terminal. With data parallelism the
    # worker hands them on to its ranks in memory (multiprocessing's spawn pipe).
    import json

    from . import data
    from .trust import audit, keys, signing

    recipe = load_recipe(run_id)
    keys.ensure_signer()
    handed = {"datasets": {k: v.hex() for path, _ in recipe.mix() for k, v in data.data_keys(path).items()},
              "signing": signing.private_raw().hex()}
    if topology.nnodes > 1:  # the agreement between machines is sealed with the cluster secret (cluster.py)
        from . import cluster

        handed["cluster"] = cluster.require_secret(keys.vault()).hex()
    read_end, write_end = os.pipe()
    cmd += ["--keys-fd", str(read_end)]
    with open(path / "worker.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, pass_fds=(read_end,))
    os.close(read_end)
    with os.fdopen(write_end, "wb") as w:
        w.write(json.dumps(handed).encode())
    info = read_json(path / "run.json")
    info["pid"] = proc.pid
    info["processes"] = n
    info.update({"nnodes": topology.nnodes, "node_rank": topology.node_rank, "rdzv": topology.rdzv}
                if topology.nnodes > 1 else {})
    write_json(path / "run.json", info)
    audit.record("train.resume" if resume else "train.start",
                 {"run": run_id, "dataset": recipe.dataset_path().name, "base_model": recipe.base_model},
                 {"recipe": recipe.name, "recipe_sha256": recipe.digest(), "pid": proc.pid, "processes": n,
                  **({"nnodes": topology.nnodes, "node_rank": topology.node_rank, "rdzv": topology.rdzv}
                     if topology.nnodes > 1 else {})})
    return proc.pid


def _processes(path: Path, info: dict, requested: int | None) -> int:
    n = requested
    if n is None and os.environ.get("APPLIANCE_DDP_PROCESSES"):
        raw = os.environ["APPLIANCE_DDP_PROCESSES"]
        try:
            n = int(raw)
        except ValueError:
            raise InvalidInput(f"APPLIANCE_DDP_PROCESSES={raw!r} is not a whole number; set it to the number of "
                               "data-parallel processes (2 or more), or unset it.") from None
    if n is None:
        n = info.get("processes")
    if n is None and (path / "plan.json").is_file():
        strategy = read_json(path / "plan.json").get("strategy") or {}
        n = int(strategy.get("replicas") or 1) if strategy.get("mode") in ("ddp", "fsdp") else 1
    n = int(n or 1)
    if not 1 <= n <= 64:
        raise InvalidInput(f"{n} training processes is out of range; use 1 to 64 (one per GPU).")
    return n


def overrides(run_id: str) -> dict:
    """What the worker changed at run time (``overrides.json``): micro-batch, accumulation, OOM recoveries."""
    path = folder("runs") / run_id / "overrides.json"
    return read_json(path) if path.is_file() else {}


def batch_settings(run_id: str, recipe: Recipe) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) the run trains with now: the recipe's, or the smaller micro-batch an
    out-of-memory recovery chose (with the same effective batch)."""
    o = overrides(run_id)
    return (int(o.get("micro_batch_size", recipe.training.micro_batch_size)),
            int(o.get("gradient_accumulation_steps", recipe.training.gradient_accumulation_steps)))


def record_batch(run_id: str, micro: int, accum: int, oom_recovery: dict | None = None) -> dict:
    """Keep the batch a run continues with after running out of memory (here, with the ``oom_recovery`` record, or
    on another node), so that a later resume keeps the smaller batch."""
    o = overrides(run_id)
    o["micro_batch_size"], o["gradient_accumulation_steps"] = micro, accum
    if oom_recovery is not None:
        o["oom_recoveries"] = [*o.get("oom_recoveries", []), oom_recovery]
    write_json(folder("runs") / run_id / "overrides.json", o)
    return o


def load_recipe(run_id: str) -> Recipe:
    from .recipes import from_dict

    raw = read_json(run_dir(run_id) / "recipe.json")
    source = raw.pop("source", None)
    recipe = from_dict(raw)
    recipe.source = source
    return recipe


def alive(run_id: str) -> bool:
    info = read_json(run_dir(run_id) / "run.json")
    pid = info.get("pid")
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and any(run_id in part for part in proc.cmdline())
    except Exception:  # gone, or not ours any more
        return False


def status(run_id: str) -> dict:
    path = run_dir(run_id)
    info = read_json(path / "run.json")
    evs = ev.read(path / "events.jsonl")
    last_progress = next((e for e in reversed(evs) if e.type == "progress"), None)
    final = next((e for e in reversed(evs) if e.type in ("finished", "failed")), None)
    if final is not None and evs[-1] is final:
        state = final.type  # even while the worker is still exiting
    elif alive(run_id):
        state = "running"
    elif not evs:
        state = "created"
    else:
        state = "interrupted"
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    return {
        **info,
        "state": state,
        "step": last_progress.data.get("step") if last_progress else 0,
        "max_steps": last_progress.data.get("max_steps") if last_progress else None,
        "loss": last_progress.data.get("loss") if last_progress else None,
        "last_checkpoint": (c.name if (c := last_checkpoint(run_id)) else None),
        "oom_recoveries": overrides(run_id).get("oom_recoveries", []),
        "error": final.message if final is not None and final.type == "failed" else None,
        "summary": summary,
        "path": str(path),
    }


REPORTS = ("merge", "export", "eval")


def reports(run_id: str) -> dict[str, dict | None]:
    """What merge, export and evaluate saved beside the run (``merge.json``...), None for a step not run yet."""
    path = run_dir(run_id)
    return {name: read_json(path / f"{name}.json") if (path / f"{name}.json").is_file() else None for name in REPORTS}


def step_of(checkpoint: Path | str) -> int:
    """The step of ``checkpoint-N`` (a folder or its name)."""
    return int(Path(checkpoint).name.removeprefix("checkpoint-"))


def checkpoints(run_id: str) -> list[Path]:
    """The checkpoints that were written completely (a kill during a save leaves one without COMPLETE), by step."""
    root = folder("runs") / run_id / "checkpoints"
    done = [p for p in root.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name.split("-")[1].isdigit()]
    return sorted(done, key=step_of)


def last_checkpoint(run_id: str) -> Path | None:
    done = checkpoints(run_id)
    return done[-1] if done else None


CHECKPOINT_CHOICES = "best, last or a step number"


def adapter(run_id: str, which: str = "best") -> dict:
    """The trained adapter (or, for full fine-tuning, weights) that merge, export and bundle take: ``best`` (the checkpoint with the lowest validation
    loss, the default), ``last`` (the adapter the run ended with) or a step with a complete checkpoint.

    Returns {path, id (for manifests' lineage), name ("adapter" or "checkpoint-N"), step, label}."""
    from .trust import manifest

    path = run_dir(run_id)
    final = path / "adapter"
    if not (final / manifest.NAME).is_file() and (path / "full" / manifest.NAME).is_file():
        final = path / "full"  # full fine-tuning: the trained weights themselves
    if not (final / manifest.NAME).is_file():
        raise NotFound(f"run {run_id} has no trained adapter in {final}; finish or resume its training first.")
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    steps = int(summary.get("steps") or 0)
    which = str(which or "best").strip().lower()
    if which == "best":
        best = summary.get("best_checkpoint")
        step = step_of(best) if best else steps
        why = f"best: validation loss {summary['best_eval_loss']:.4f}" if best else "best: no evaluation, so the last"
    elif which == "last":
        step, why = steps, "last"
    elif which.removeprefix("checkpoint-").isdigit():
        step, why = step_of(which), "chosen"
    else:
        raise InvalidInput(f"--checkpoint {which!r} is not {CHECKPOINT_CHOICES}; run {run_id} has "
                           f"{_steps_text(run_id, steps)}.")
    if step == steps:
        return {"path": final, "id": f"{run_id}/{final.name}", "name": final.name, "step": step,
                "label": f"step {step} ({why}, the final {'weights' if final.name == 'full' else 'adapter'})"}
    ckpt = path / "checkpoints" / f"checkpoint-{step}"
    if not (ckpt / COMPLETE).is_file() or not (ckpt / manifest.NAME).is_file():
        raise NotFound(f"run {run_id} has no complete, signed checkpoint at step {step}; it has "
                       f"{_steps_text(run_id, steps)}.")
    return {"path": ckpt, "id": f"{run_id}/checkpoints/{ckpt.name}", "name": ckpt.name, "step": step,
            "label": f"step {step} ({why}, {ckpt.name})"}


def _steps_text(run_id: str, steps: int) -> str:
    saved = [step_of(p) for p in checkpoints(run_id)]
    return f"checkpoints at steps {', '.join(map(str, saved))} and the final adapter at step {steps}" if saved else \
        f"only the final adapter (step {steps})"


def resume(run_id: str, processes: int | None = None, nnodes: int | None = None, node_rank: int | None = None,
           rdzv: str | None = None) -> int:
    st = status(run_id)
    if st["state"] == "running":
        raise InvalidInput(f"run {run_id} is still running (pid {st['pid']}); `appliance runs follow {run_id}` shows it.")
    if st["state"] == "finished":
        raise InvalidInput(f"run {run_id} has finished; there is nothing to resume.")
    return start(run_id, resume=True, processes=processes, nnodes=nnodes, node_rank=node_rank, rdzv=rdzv)


def stop(run_id: str) -> bool:
    """Ask the worker to stop (SIGTERM); it saves nothing partial and the run stays resumable."""
    if not alive(run_id):
        return False
    pid = read_json(run_dir(run_id) / "run.json")["pid"]
    os.kill(pid, signal.SIGTERM)
    from .trust import audit

    audit.record("train.stop", {"run": run_id}, {"pid": pid})
    return True


def follow(run_id: str, poll: float = 0.25):
    """Events of the run's latest attempt (a resume starts a new one), live until it ends."""
    path = run_dir(run_id) / "events.jsonl"
    start = ev.last_offset(path, lambda e: e.type == "stage" and "resume" in e.data)
    return ev.follow(path, alive=lambda: alive(run_id), poll=poll, start=start)
