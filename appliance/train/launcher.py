"""Ranks under PyTorch's elastic launcher: several processes on one machine, or several machines.

Contract: ``launch(run, recipe, resume, emit, topology, handed)`` runs ``topology.processes`` ranks on this machine
with torchelastic's ``LocalElasticAgent`` (what ``torchrun`` runs), as node ``topology.node_rank`` of
``topology.nnodes``. The agent sets each rank's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the store's address;
the entry point is a function, so the agent starts the ranks with multiprocessing's ``spawn`` and the keys reach
them pickled through spawn's pipe: in memory, never on disk, in the environment or on a command line.

The rendezvous is the appliance's own backend (``appliance``) on c10d's TCPStore: node 0 hosts the store on a
socket it binds itself, so it listens on the rendezvous address only (c10d would listen on every interface,
which the egress guard cannot see: it is C++), on loopback unless the operator declared the address. Before the
ranks start, the nodes agree on what they train, through the store, each entry sealed with the cluster secret
(``cluster.py`` says why; node 0 also checks who is really connected): the same recipe and the same data (digests
of the decrypted records, never the text), the same processes per node, only declared members, the smallest
micro-batch any node has (a node that ran out of memory halved its own), and the newest checkpoint complete on
every node (a node killed during a save has one fewer).

Failures: an out-of-memory error in a rank restarts all ranks with a halved micro-batch (the same effective
batch) from the newest checkpoint: on one machine with a fresh store; across machines every node's launcher says
through node 0's store how its ranks ended (``oom``, ``gone``: its collectives lost a peer, ``error``), and when one
ran out of memory and none failed otherwise, all start a new round (a new key prefix on the same store, and the
ranks' process group under the round's prefix) in which they agree on the smaller micro-batch and the newest
common checkpoint. A node that dies says nothing: the others stop after ``VERDICT_TIMEOUT_S`` with a sentence
saying so, and ``runs resume`` on every node continues. A stop (SIGTERM to the worker) reaches every rank, and they
save at the same step.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from .. import events as ev
from ..errors import ApplianceError, StageFailed
from ..cluster import Topology
from ..recipes import Recipe
from ..trust import egress
from ..trust import keys as trust_keys
from . import proc

RENDEZVOUS_TIMEOUT_S = int(os.environ.get("APPLIANCE_RDZV_TIMEOUT", 900))
VERDICT_TIMEOUT_S = 60  # how long a node waits, after its ranks ended, to hear how the other nodes' ended
_BACKEND = "appliance"


def endpoint(topology: Topology) -> tuple[str, int]:
    from .. import cluster

    if topology.rdzv:
        return cluster.parse(topology.rdzv, "--rdzv")
    return "127.0.0.1", _free_loopback_port()


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the launcher (the worker process: one torchelastic agent per machine) -----------------------------------------


def launch(run: Path, recipe: Recipe, resume: bool, emit: ev.Emit, topology: Topology, handed: dict) -> None:
    """Run the ranks of this machine until they finish, stop, or fail."""
    import multiprocessing as mp

    from .. import cluster
    from ..runs import batch_settings
    from .callbacks import recover

    host, port = endpoint(topology)
    across = topology.nnodes > 1
    local = "127.0.0.1"
    if across and not egress.is_loopback(host):
        cluster.enable()  # the guard now lets this process reach the declared peers, and nothing else
        try:
            local = cluster.route_source(host, port)  # also proves the guard lets the rendezvous through
        except PermissionError as e:
            raise StageFailed(f"the rendezvous {topology.rdzv} is not reachable under the egress policy ({e}); "
                              "`appliance cluster allow` declares the cluster's machines.") from None
        cluster.enable(local)
    environment(topology, local)
    _quiet_hostname_lookups()
    reports = mp.get_context("spawn").SimpleQueue()  # what a failing rank has to say (the pipe is spawn's)
    shared, attempt = None, 0  # across machines: node 0's store, kept for every round, and the round
    while True:
        if across:
            import torch.distributed as dist

            shared = shared or _store(topology, host, port)
            store = dist.PrefixStore(f"appliance/round/{attempt}/", shared)
        else:
            store = _store(topology, host, port)
        batch = batch_settings(run.name, recipe)
        agreed = agree(store, run, recipe, resume, topology, local, batch,
                       bytes.fromhex(handed["cluster"]) if handed.get("cluster") else None)
        if agreed["micro_batch_size"] != batch[0]:
            _adopt_batch(run, emit, agreed)
        micro, accum = agreed["micro_batch_size"], agreed["gradient_accumulation_steps"]  # what the ranks train with
        args = (str(run), resume, agreed["checkpoint"], _keys_for(handed), reports, os.getpid(), attempt)
        failure = _run_agent(store, host, port, topology, local, args, run)
        if failure is None:
            return
        said = []
        while not reports.empty():
            said.append(reports.get())
        oom = next((m for m in said if m[0] == "oom"), None)
        if oom is not None and not across:
            recover(run, emit, oom[2], oom[1], micro, accum)
            resume = True
            host, port = endpoint(topology)  # a fresh store on one machine: no stale keys of the last round
            continue
        error = next((m for m in said if m[0] == "error"), None)
        failed = error is not None and not (across and _peer_gone(error[1]))
        if across:
            verdicts = _verdicts(store, topology, "error" if failed else "oom" if oom else "gone")
            if oom is not None:
                recover(run, emit, oom[2], oom[1], micro, accum)  # this node's share of the smaller batch
            if verdicts and "oom" in verdicts.values() and "error" not in verdicts.values():
                at = [r for r, v in verdicts.items() if v == "oom"]
                emit(ev.Event("stage", proc.STAGE, f"node {', '.join(map(str, at))} ran out of memory; every node "
                              "continues from the newest checkpoint they all have, with the smaller micro-batch",
                              {"restart": {"round": attempt + 1, "out_of_memory": at}}))
                resume, attempt = True, attempt + 1
                continue
            if oom is not None:
                raise StageFailed(f"{oom[2]}: out of memory at step {oom[1]}; this node halved its micro-batch, but "
                                  "not every node answered to go on. `appliance runs resume` on every node "
                                  "continues, and the nodes agree on the smaller micro-batch.")
        if failed:
            raise StageFailed(error[1]) if error[2] else RuntimeError(error[1])
        if across:
            raise StageFailed(f"the training processes stopped because another node left the run ({failure}); "
                              "`appliance runs resume` on every node continues from the newest checkpoint they all "
                              "have.")
        raise StageFailed(f"a training process ended ({failure}); see worker.log in the run's folder; `appliance "
                          "runs resume` continues from the last checkpoint.")


def environment(topology: Topology, local: str) -> None:
    """What the ranks inherit: the interface the collectives use (the one holding this machine's address on the
    route to the rendezvous; loopback on one machine), and NCCL told when the GPUs cannot talk peer to peer."""
    from .. import cluster

    iface = cluster.interface_of(local) or "lo"
    os.environ.update({"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface})
    if _needs_p2p_off():
        # Consumer GPUs without peer-to-peer (two RTX 4090: no NVLink, P2P disabled by the driver): NCCL's P2P
        # transport hangs or corrupts there; shared memory through the host is what works.
        os.environ["NCCL_P2P_DISABLE"] = "1"


def _needs_p2p_off() -> bool:
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            return False
        from .. import hardware

        links = hardware.detect().links or {}
        return any(v == "none" for v in links.values())
    except Exception:  # no NVML: leave NCCL to find out
        return False


def _quiet_hostname_lookups() -> None:
    """torchelastic names the host in its status events by ``socket.getfqdn()``, which asks the resolver about
    this machine's name: the egress guard refuses and records every one. The plain host name says the same."""
    import socket

    from torch.distributed.elastic.agent.server import api, local_elastic_agent

    api._get_fq_hostname = socket.gethostname
    local_elastic_agent.LocalElasticAgent._get_fq_hostname = lambda self: socket.gethostname()


def _store(topology: Topology, host: str, port: int):
    """c10d's TCPStore for the rendezvous: hosted by node 0 on a socket bound here (to ``host`` only), joined by
    the others."""
    import datetime
    import socket

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if topology.node_rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))  # the egress guard judges this bind: loopback, or a declared address
        except OSError as e:
            listener.close()
            raise StageFailed(f"cannot listen for the rendezvous on {host}:{port} ({e}); give --rdzv this machine's "
                              "own address and a free port.") from None
        listener.listen(128)
        fd = listener.detach()  # the store's server owns it from here
        return dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False, master_listen_fd=fd)
    try:
        return dist.TCPStore(host, port, None, False, timeout)
    except (RuntimeError, TimeoutError, dist.DistStoreError) as e:
        raise StageFailed(f"node {topology.node_rank} could not reach the rendezvous at {host}:{port} within "
                          f"{RENDEZVOUS_TIMEOUT_S} s ({str(e).splitlines()[0]}); start node 0 first, with the same "
                          "--rdzv.") from None


def data_digest(recipe: Recipe) -> str:
    """sha256 of what every node must train on alike: the records of each dataset's train and validation splits,
    decrypted in memory (their order too: ranks take their share of each batch by position), and the weights."""
    from .. import data

    h = hashlib.sha256()
    for path, weight in recipe.mix():
        h.update(repr(weight).encode())
        for split in ("train", "validation"):
            records = (data.load_pairs if recipe.method == "dpo" else data.load_split)(path, split)
            for r in records:
                h.update(hashlib.sha256(json.dumps(r, sort_keys=True, ensure_ascii=False).encode()).digest())
    return h.hexdigest()


def agree(store, run: Path, recipe: Recipe, resume: bool, topology: Topology, local: str,
          batch: tuple[int, int], secret: bytes | None = None) -> dict:
    """Every node says what it would train; each node checks them all and they reach the same decision."""
    from ..runs import checkpoints, step_of

    if topology.nnodes == 1:
        from ..runs import last_checkpoint

        ckpt = last_checkpoint(run.name) if resume else None
        return {"micro_batch_size": batch[0], "gradient_accumulation_steps": batch[1],
                "checkpoint": ckpt.name if ckpt else None}
    mine = {"address": local, "recipe": recipe.digest(), "data": data_digest(recipe), "processes": topology.processes,
            "micro": batch[0], "accum": batch[1], "resume": resume,
            "checkpoints": [step_of(c) for c in checkpoints(run.name)] if resume else []}
    nodes = exchange(store, topology, secret, mine, local)
    return decide(nodes, mine, resume, batch)


def exchange(store, topology: Topology, secret: bytes | None, mine: dict, local: str) -> list[dict]:
    """Each node's entry, sealed with the cluster secret, through node 0's store; returns every node's, opened.

    Node 0 first puts a fresh challenge (sealed); every entry carries it, so an entry of an earlier round replayed
    does not count. An entry that does not open, and on node 0 a connection to the store from an undeclared
    address, stops the run with a sentence naming what was refused."""
    import datetime

    from .. import cluster

    if secret is None:
        raise StageFailed("training across machines needs the cluster secret in every node's vault: `appliance "
                          "cluster secret create` on one machine, `appliance cluster secret import` on the others.")
    prefix = "appliance/agree/"
    rank = topology.node_rank
    host, port = cluster.parse(topology.rdzv, "--rdzv")
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)

    def wait(keys: list[str]) -> None:
        try:
            store.wait(keys, timeout)
        except Exception as e:
            raise StageFailed(f"not every node joined the rendezvous within {RENDEZVOUS_TIMEOUT_S} s "
                              f"({str(e).splitlines()[0]}); start `appliance train` (or `runs resume`) on all "
                              f"{topology.nnodes} machines with the same --rdzv.") from None

    if rank == 0:
        challenge = os.urandom(16).hex()
        store.set(prefix + "challenge", cluster.seal(secret, "challenge", {"challenge": challenge}))
    else:
        wait([prefix + "challenge"])
        opened = cluster.unseal(secret, "challenge", store.get(prefix + "challenge"))
        if opened is None:
            raise StageFailed(f"the rendezvous at {cluster.show(host, port)} did not prove the cluster secret: the "
                              "machines hold different secrets (compare `appliance cluster secret show` on each), or "
                              "another host answered there.")
        challenge = opened["challenge"]
    store.set(f"{prefix}{rank}", cluster.seal(secret, f"node/{rank}", {**mine, "challenge": challenge}))
    keys = [f"{prefix}{r}" for r in range(topology.nnodes)]
    wait(keys)
    nodes: list[dict | None] = []
    for r, key in enumerate(keys):
        opened = cluster.unseal(secret, f"node/{r}", store.get(key))
        nodes.append(opened if opened is not None and opened.get("challenge") == challenge else None)
    unproven = [r for r, n in enumerate(nodes) if n is None]
    if rank == 0:
        proven = {n["address"] for n in nodes if n is not None} | {local}
        connected = cluster.connected_peers(port)
        strangers = sorted(a for a in connected if a not in proven and not egress.is_loopback(a))
        undeclared = [a for a in strangers if not cluster.declared(a)]
        if undeclared:
            raise StageFailed(f"the rendezvous has a connection from {', '.join(undeclared)}, which is not a declared "
                              "member of this cluster: refused. If it is one, `appliance cluster allow` it here.")
        if unproven:
            who = f" (connected from {', '.join(strangers)})" if strangers else ""
            raise StageFailed(f"node {unproven[0]}'s entry{who} did not prove the cluster secret: refused. Every "
                              "machine must hold the same secret (`appliance cluster secret show` prints its "
                              "fingerprint on each).")
        for r, n in enumerate(nodes):
            if r and not egress.is_loopback(n["address"]) and n["address"] not in connected:
                raise StageFailed(f"node {r} says it joined from {n['address']}, but no connection to the rendezvous "
                                  "comes from there: refused.")
    elif unproven:
        raise StageFailed(f"node {unproven[0]}'s entry did not prove the cluster secret: refused. Every machine must "
                          "hold the same secret (`appliance cluster secret show` prints its fingerprint on each).")
    return nodes


def decide(nodes: list[dict], mine: dict, resume: bool, batch: tuple[int, int]) -> dict:
    """What every node trains with, from every node's entry; a sentence for each way the nodes disagree."""
    from .. import cluster

    for r, n in enumerate(nodes):
        if n["recipe"] != mine["recipe"]:
            raise StageFailed(f"node {r} trains another recipe (sha256 {n['recipe'][:12]}, here {mine['recipe'][:12]}); "
                              "start every node from the same recipe file.")
        if n["data"] != mine["data"]:
            raise StageFailed(f"node {r} has other training data (sha256 {n['data'][:12]}, here {mine['data'][:12]}); "
                              "give every node the same dataset: `appliance data package NAME OUT` on node 0, "
                              "`appliance data import OUT` on the others.")
        if n["processes"] != mine["processes"]:
            raise StageFailed(f"node {r} runs {n['processes']} processes, this node {mine['processes']}; give every "
                              "node the same --processes.")
        if n["resume"] != resume:
            raise StageFailed(f"node {r} {'resumes' if n['resume'] else 'starts afresh'} and this node does not; "
                              "start a new run on every node, or `runs resume` on every node.")
        if not egress.is_loopback(n["address"]) and not cluster.declared(n["address"]):
            raise StageFailed(f"node {r} joined from {n['address']}, which is not a declared peer here; `appliance "
                              f"cluster allow {n['address']}` on this machine admits it.")
    effective = batch[0] * batch[1]
    if any(n["micro"] * n["accum"] != effective for n in nodes):
        raise StageFailed("the nodes disagree on the effective batch (micro-batch x accumulation); start every node "
                          "from the same recipe.")
    micro = min(n["micro"] for n in nodes)
    common = set.intersection(*(set(n["checkpoints"]) for n in nodes)) if resume else set()
    checkpoint = f"checkpoint-{max(common)}" if common else None
    if resume and not common and any(n["checkpoints"] for n in nodes):
        checkpoint = None  # no checkpoint every node has: all start again from the beginning
    return {"micro_batch_size": micro, "gradient_accumulation_steps": effective // micro, "checkpoint": checkpoint,
            "nodes": [n["address"] for n in nodes]}


def _verdicts(store, topology: Topology, mine: str) -> dict[int, str] | None:
    """How every node's ranks ended (``oom``, ``gone``, ``error``), through the round's keys of node 0's store; None
    when a node does not say within VERDICT_TIMEOUT_S (it died, or node 0's store with it)."""
    import datetime

    keys = [f"appliance/verdict/{r}" for r in range(topology.nnodes)]
    try:
        store.set(keys[topology.node_rank], mine)
        store.wait(keys, datetime.timedelta(seconds=VERDICT_TIMEOUT_S))
        return {r: store.get(k).decode() for r, k in enumerate(keys)}
    except Exception:  # the store's host is gone, or a node never answered
        return None


def _adopt_batch(run: Path, emit: ev.Emit, agreed: dict) -> None:
    """Another node ran out of memory and halved its micro-batch: this node takes the same, for the same steps."""
    from ..runs import record_batch

    record_batch(run.name, agreed["micro_batch_size"], agreed["gradient_accumulation_steps"])
    emit(ev.Event("stage", proc.STAGE, f"micro-batch {agreed['micro_batch_size']} x accumulation "
                  f"{agreed['gradient_accumulation_steps']}, as another node chose after running out of memory",
                  {"adopted_batch": [agreed["micro_batch_size"], agreed["gradient_accumulation_steps"]]}))


def _keys_for(handed: dict) -> dict:
    return {"datasets": handed.get("datasets", {}), **({"signing": handed["signing"]} if handed.get("signing") else {})}


def _peer_gone(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "timed out",
                                   "connection refused", "nccl", "gloo"))


def _run_agent(store, host: str, port: int, topology: Topology, local: str, args: tuple, run: Path) -> str | None:
    """One torchelastic agent for this machine's ranks; None when they all finished (or stopped), else what
    failed."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    class Rendezvous(StaticTCPRendezvous):
        """torchelastic's static rendezvous on the store made above (its own would listen on every interface)."""

        def get_backend(self) -> str:
            return _BACKEND

    # The rendezvous id prefixes the store's keys: one for all nodes (each machine's run has its own id).
    handler = Rendezvous(host, port, topology.node_rank, topology.nnodes, _BACKEND, RENDEZVOUS_TIMEOUT_S)
    handler._store = store
    spec = WorkerSpec(role="trainer", local_world_size=topology.processes, entrypoint=rank_main, args=args,
                      rdzv_handler=handler, max_restarts=0, monitor_interval=0.2, local_addr=local)
    # No log folder (os.devnull): the ranks write to the worker's log, and torchelastic leaves no error files.
    agent = LocalElasticAgent(spec, DefaultLogsSpecs(log_dir=os.devnull), start_method="spawn",
                              shutdown_timeout=600, exit_barrier_timeout=600)
    try:
        result = agent.run()
    except SignalException:
        return None  # a stop: every rank saved at the same step and ended
    if not result.is_failed():
        return None
    failure = next(iter(result.failures.values()))
    return f"rank {failure.local_rank} of this node ended with status {failure.exitcode}"


# -- one rank (a spawned process) ----------------------------------------------------------------------------------


def rank_main(run_dir: str, resume: bool, checkpoint: str | None, keys: dict, reports, parent: int,
              attempt: int = 0) -> None:
    """One rank: the keys arrive in memory, RANK/LOCAL_RANK/WORLD_SIZE and the store from the launcher;
    ``attempt``: the launcher's round (the process group's keys live under its prefix)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)
    trust_keys.use_handed(keys)
    rank, world = proc.world()
    run = Path(run_dir)
    emit = ev.EventLog(run / "events.jsonl") if proc.writes() else ev.ignore

    def on_term(signum, frame):
        if proc.training_started:
            proc.stop_requested = True
        else:
            raise proc.Stopped()

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        from ..runs import load_recipe
        from .trainer import train

        _join_group(attempt)
        train(run, load_recipe(run.name), resume, emit, checkpoint=checkpoint)
    except proc.Stopped:
        if proc.writes():
            emit(ev.Event("warning", proc.STAGE, "stopped on request; `appliance runs resume` continues from the last "
                          "checkpoint"))
    except ApplianceError as e:
        reports.put(("error", str(e)[:2000], True))
        status = 1
    except Exception as e:
        from .callbacks import describe_oom, is_oom

        if is_oom(e):
            reports.put(("oom", proc.progress["step"] + 1, f"rank {rank}: {describe_oom(e)}"))
            status = proc.OOM_EXIT
        else:
            traceback.print_exc()
            reports.put(("error", f"rank {rank}: {type(e).__name__}: {e}"[:2000], False))
            status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)  # no interpreter teardown: a rank whose peer died must not wait on it at exit
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _join_group(attempt: int = 0) -> None:
    """Join the process group before the Trainer would (it then uses this one), as a client of node 0's store (no
    listener of its own), under the round's prefix: a round after an out-of-memory error across machines reuses the
    store, whose keys of the last round (the ranks' addresses) must not be read again."""
    import datetime

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=30)
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False, timeout)
    rank, world = proc.world()
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"appliance/pg/{attempt}/", client),
                            rank=rank, world_size=world, timeout=timeout)
