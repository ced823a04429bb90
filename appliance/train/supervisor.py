"""Data parallelism: the supervisor and its ranks.

Contract: ``supervise(run, recipe, resume, emit, processes, handed)`` starts ``processes`` ranks with
multiprocessing's ``spawn``, hands each its keys in memory (never disk, environment or command line), lets them
meet on 127.0.0.1 (gloo on the CPU, NCCL on GPUs; PyTorch's store gets a socket bound to loopback, as it would
otherwise listen on every interface), forwards a stop, kills the ranks if it dies (PDEATHSIG), and restarts
them all with a halved micro-batch after an out-of-memory error in any of them. Rank 0 alone writes events,
checkpoint markers, the summary, manifests and audit entries.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from .. import events as ev
from ..errors import ApplianceError, StageFailed
from ..recipes import Recipe
from ..trust import keys as trust_keys
from . import proc
from .callbacks import describe_oom, is_oom, recover
from .trainer import train


# -- data parallelism: the supervisor and its ranks ----------------------------------------------------------------


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supervise(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit, processes: int, handed: dict) -> None:
    """Start ``processes`` ranks, wait for them, and restart them all with a smaller micro-batch after an
    out-of-memory error in any of them (the others are blocked in a collective by then and are killed)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from ..runs import batch_settings

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
        proc.children[:] = ranks
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
        proc.children.clear()
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
    trust_keys.use_handed(keys)
    run = Path(run_dir)
    emit = ev.EventLog(run / "events.jsonl") if rank == 0 else ev.ignore

    def on_term(signum, frame):
        if proc.training_started:
            proc.stop_requested = True
        else:
            raise proc.Stopped()

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        from ..runs import load_recipe

        _rendezvous(rank, world, port)
        train(run, load_recipe(run.name), resume, emit)
    except proc.Stopped:
        if rank == 0:
            emit(ev.Event("warning", proc.STAGE, "stopped on request; `appliance runs resume` continues from the last "
                          "checkpoint"))
    except ApplianceError as e:
        outbox.send(("error", str(e)[:2000], True))
        status = 1
    except Exception as e:
        if is_oom(e):
            outbox.send(("oom", proc.progress["step"] + 1, f"rank {rank}: {describe_oom(e)}"))
            status = proc.OOM_EXIT
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
