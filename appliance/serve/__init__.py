"""`appliance serve`: the tuned model behind an OpenAI-compatible endpoint, on loopback, with keys and tenants.

Two processes: llama.cpp's ``llama-server`` (``engine.py``: continuous batching over ``--parallel`` slots, the
GGUF's chat template, the adapters loaded once) on a private Unix socket, and this gateway (``gateway.py``:
keys, tenants, adapters per request, token counts) on TCP, loopback unless the operator declared another
address. Two ways to serve:

- **merged** (``serve RUN``): the run's exported GGUF; every tenant with a key may call it, by the run's id;
- **adapters** (``serve BASE --adapter TENANT=RUN ...``): one resident base, each tenant answered through its own
  LoRA (``export RUN --adapter``), called by the run's id; a tenant without an adapter has no model here.

On an edge box, MODEL may be an edge bundle folder (``bundle RUN --out DIR``: its ``serve.json`` names the
model file), and RUN a bundle made with ``--adapter`` (its adapter served on the base GGUF whose sha256 it
records); a bundle is verified before it is served.

While it runs, ``serve/running/<pid>.json`` says where it listens and what it has served (the TUI's Serve
screen and ``doctor`` read it); per-tenant counts go to the audit log (``serve.usage``) every minute and at the
end. Starting and stopping are audited too (``serve.start``, ``serve.stop``), with the address.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInput, NotFound, StageFailed

DEFAULT_PORT = 8080


# -- where it may listen ------------------------------------------------------------------------------------------

def _network_file() -> Path:
    from .keys import serve_dir

    return serve_dir() / "network.json"


def allowed_hosts() -> list[str]:
    """The non-loopback addresses the operator allowed `serve --host` to listen on."""
    from ..workspace import read_json

    path = _network_file()
    return list(read_json(path).get("listen", [])) if path.is_file() else []


def _numeric(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise InvalidInput(f"{address!r} is not a numeric IP address; give one (e.g. the workstation's own LAN "
                           "address), not a host name.") from None


def local_addresses() -> set[str]:
    """The addresses of this machine's interfaces (in its network namespace)."""
    import psutil

    out = set()
    for entries in psutil.net_if_addrs().values():
        for e in entries:
            try:
                out.add(str(ipaddress.ip_address(e.address.split("%")[0])))
            except ValueError:
                continue  # a MAC address
    return out


def _interface_address(ip: str, flag: str) -> None:
    """Refuse what is not one interface's own unicast address: a wildcard binds every interface (including any
    added later), a multicast or broadcast address is nobody's, and another machine's address cannot be bound."""
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified:
        raise InvalidInput(f"{flag} {ip} is the wildcard address: it would listen on every interface, including "
                           "ones added later; give the address of the one interface clients reach.")
    if addr.is_multicast or (addr.version == 4 and ip == "255.255.255.255"):
        raise InvalidInput(f"{flag} {ip} is a multicast or broadcast address, not an interface's own; give the "
                           "address of the interface clients reach.")
    if ip not in local_addresses():
        raise InvalidInput(f"{flag} {ip} is not an address of this machine's interfaces (`ip addr` lists them); "
                           "give one of those.")


def allow_host(address: str, remove: bool = False) -> list[str]:
    """Declare (or withdraw) a non-loopback address `serve --host` may listen on; audited."""
    from ..trust import audit
    from ..workspace import write_json

    ip = _numeric(address)
    if ipaddress.ip_address(ip).is_loopback:
        raise InvalidInput(f"{ip} is loopback: serving there needs no permission.")
    if not remove:
        _interface_address(ip, "serve allow")
    hosts = [h for h in allowed_hosts() if h != ip] + ([] if remove else [ip])
    write_json(_network_file(), {"format": 1, "listen": sorted(hosts)})
    audit.record("serve.listen.remove" if remove else "serve.listen.allow", details={"address": ip})
    return sorted(hosts)


def check_host(host: str) -> str:
    """The numeric address to bind; a non-loopback one only if the operator allowed it and it is one of this
    machine's interfaces now (then the guard lets it)."""
    from ..trust import egress

    if host.lower() in ("localhost", "localhost."):
        return "127.0.0.1"
    ip = _numeric(host)
    if ipaddress.ip_address(ip).is_loopback:
        return ip
    _interface_address(ip, "--host")
    if ip not in allowed_hosts():
        raise InvalidInput(f"--host {ip} is not loopback, and the operator has not allowed serving there; "
                           f"`appliance serve allow {ip}` declares it (recorded in the audit log).")
    egress.allow_listen(ip)
    return ip


# -- what runs ----------------------------------------------------------------------------------------------------

def running_dir() -> Path:
    from .keys import serve_dir

    folder = serve_dir() / "running"
    folder.mkdir(exist_ok=True)
    return folder


def running() -> list[dict]:
    """The servers of this workspace that are running now (a state file whose process is gone is removed)."""
    from ..workspace import read_json

    out = []
    for path in sorted(running_dir().glob("*.json")):
        try:
            state = read_json(path)
            os.kill(int(state["pid"]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(state)
    return out


@dataclass
class Plan:
    """What a server will run: the GGUF, the adapters, and which tenant may call which model name."""

    gguf: Path
    name: str
    adapters: list[Path]
    tenants: dict[str, str]  # tenant -> run id (adapters mode); empty: every tenant, the one model
    describe: dict


def plan(model: str, adapters: list[str] | None = None) -> Plan:
    """Resolve MODEL (and TENANT=RUN pairs) to files; refuse what cannot be served, naming what to do."""
    from ..infer import resolve
    from . import keys

    pairs: dict[str, str] = {}
    for item in adapters or []:
        tenant, sep, run = item.partition("=")
        if not sep or not tenant or not run:
            raise InvalidInput(f"--adapter {item!r} needs the form TENANT=RUN, e.g. --adapter acme=run-20261128-1.")
        keys.check_tenant(tenant)
        if tenant in pairs:
            raise InvalidInput(f"--adapter names tenant {tenant!r} twice; give each tenant one adapter.")
        pairs[tenant] = run
    served = _bundle_config(model)
    if served is not None:  # an edge bundle: its model file, under its run's name
        gguf, name = Path(model) / served["model"]["file"], served["model"]["name"]
    else:
        gguf = resolve(model)
        name = Path(model).stem if model.endswith(".gguf") else model
    files, names = [], {}
    for tenant, run in pairs.items():
        carried = _bundle_config(run)
        if carried is not None:  # an edge bundle carrying an adapter: it fits only the base GGUF it names
            files.append(_bundled_adapter(Path(run), carried, gguf))
            names[tenant] = carried["adapter"]["name"]
        else:
            files.append(adapter_gguf(run, model))
            names[tenant] = run
    return Plan(gguf=gguf, name=name, adapters=files, tenants=names,
                describe={"model": name, "gguf": str(gguf), "mode": "adapters" if pairs else "merged",
                          "adapters": dict(names)})


def _bundle_config(path: str) -> dict | None:
    """The serve.json of an edge bundle folder, its bundle verified first (integrity and signatures, by the key
    it carries: `bundle verify --fingerprint` is how an operator checks its origin); None if not a bundle."""
    folder = Path(path).expanduser()
    if not (folder / "serve.json").is_file():
        return None
    from .. import bundle
    from ..workspace import read_json

    bundle.verify_bundle(folder)
    return read_json(folder / "serve.json")


def _bundled_adapter(folder: Path, served: dict, base: Path) -> Path:
    from ..trust import manifest

    adapter = served.get("adapter")
    if not adapter:
        raise InvalidInput(f"the bundle {folder} carries no adapter; bundle the run with `appliance bundle RUN "
                           "--adapter`, or serve the bundle itself (`appliance serve DIR`).")
    if manifest.sha256_file(base) != adapter["base_gguf_sha256"]:
        raise InvalidInput(f"the adapter in {folder} fits only {adapter['base_model']}'s f16 GGUF (sha256 "
                           f"{adapter['base_gguf_sha256'][:16]}...), and {base} is another file; serve that base.")
    return folder / adapter["file"]


def adapter_gguf(run: str, base: str) -> Path:
    """RUN's GGUF adapter, which must have been trained on ``base`` (the imported model served)."""
    from .. import runs
    from ..export import ADAPTER_DIR, ADAPTER_FILE
    from ..workspace import folder

    if not (folder("runs") / run / "run.json").is_file():
        raise NotFound(f"run {run!r} does not exist; `appliance runs list` shows the runs.")
    trained_on = runs.load_recipe(run).base_model
    if trained_on != base:
        raise InvalidInput(f"run {run} was trained on {trained_on}, not {base}: an adapter fits only its own base; "
                           f"serve {trained_on} for it.")
    path = folder("runs") / run / ADAPTER_DIR / ADAPTER_FILE
    if not path.is_file():
        raise NotFound(f"run {run} has no adapter GGUF; run `appliance export {run} --adapter` first.")
    return path


class Server:
    """The engine, the gateway on TCP, the state file and the usage reports; ``run()`` blocks until stopped."""

    def __init__(self, model: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1", parallel: int = 4,
                 ctx: int = 2048, threads: int | None = None, adapters: list[str] | None = None,
                 report_every: float = 60.0, limits=None, tls_cert: str | None = None,
                 tls_key: str | None = None, insecure: bool = False):
        from . import keys
        from .limits import Limits

        if not 0 <= port <= 65535:
            raise InvalidInput(f"--port must be between 1 and 65535 (0 picks a free one); got {port}.")
        if bool(tls_cert) != bool(tls_key):
            raise InvalidInput("--tls-cert and --tls-key go together; give both (`appliance serve cert --host "
                               "ADDRESS` makes a pair).")
        self.plan = plan(model, adapters)
        self.host = check_host(host)
        self.limits = limits or Limits()
        self.tls = (str(tls_cert), str(tls_key)) if tls_cert else None
        self.fingerprint = None
        if self.tls:
            from .tls import check_pair

            self.fingerprint = check_pair(*self.tls)
        self.insecure = False
        if not ipaddress.ip_address(self.host).is_loopback and not self.tls:
            if not insecure:
                raise InvalidInput(f"--host {self.host} is reachable from the network, and without TLS keys, prompts and "
                                   "answers would cross it in clear; give --tls-cert/--tls-key (`appliance serve cert "
                                   f"--host {self.host}` makes a pair), or --insecure to accept that (audited).")
            self.insecure = True
        self.port, self.parallel, self.ctx, self.threads = port, parallel, ctx, threads
        self.report_every = report_every
        if not keys.active():
            raise InvalidInput("no API key exists, so nobody could call this server; create one with "
                               "`appliance serve keys create --tenant NAME` first.")
        from .engine import Engine
        from .gateway import Usage

        self.engine = Engine(self.plan.gguf, self.plan.adapters, parallel=parallel, ctx=ctx, threads=threads,
                             alias=self.plan.name)
        self.usage = Usage()
        self.crash: str | None = None
        self._uvicorn = None
        self._stop = threading.Event()
        self.url = ""
        self.started = ""

    def routes(self):
        from .gateway import Route

        if not self.plan.tenants:
            return [Route(self.plan.name)]
        return {tenant: [Route(run, adapter=i)] for i, (tenant, run) in enumerate(self.plan.tenants.items())}

    def _listen(self):
        import socket

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP, and
        # with Nagle on, every small answer waited ~40 ms for the client's delayed ACK (measured: /v1/models
        # took 44 ms, now under 2).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            if isinstance(e, PermissionError) and "egress guard" in str(e):
                raise InvalidInput(str(e)) from None
            raise InvalidInput(f"cannot listen on {self.host}:{self.port} ({e.strerror or e}); choose another "
                               "--port.") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def state(self) -> dict:
        return {"pid": os.getpid(), "url": self.url, "host": self.host, "port": self.port,
                "engine": "llama-server", "engine_pid": self.engine.proc.pid if self.engine.proc else None,
                "parallel": self.parallel, "ctx": self.ctx, "started": self.started, **self.plan.describe,
                "tls": self.fingerprint, "limits": self._limits(),
                "tenants": sorted(self.plan.tenants) or "every tenant with a key", "usage": self.usage.snapshot()}

    def run(self, on_ready=None) -> dict:
        """Serve until Ctrl-C / SIGTERM / ``stop()``; a crash of the engine ends it with StageFailed."""
        import uvicorn

        from ..trust import audit
        from ..workspace import write_json
        from .gateway import build
        from .limits import protocol

        sock = self._listen()
        self.port = sock.getsockname()[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if self.tls else 'http'}://{shown}:{self.port}/v1"
        state_file = running_dir() / f"{os.getpid()}.json"
        try:
            self.engine.start()
        except BaseException:
            sock.close()
            raise
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        audit.record("serve.start", details={**self.plan.describe, "host": self.host, "port": self.port,
                                             "loopback": ipaddress.ip_address(self.host).is_loopback,
                                             "parallel": self.parallel, "engine": "llama-server",
                                             "tls": self.fingerprint, "insecure": self.insecure,
                                             "limits": self._limits()})
        app = build(self.engine.socket, self.routes(), len(self.plan.adapters), self.usage,
                    ready=self.engine.alive, failure=self.engine.failure, parallel=self.parallel,
                    ctx=self.engine.slot_ctx,
                    limits=self.limits)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5, http=protocol(self.limits),
                                h11_max_incomplete_event_size=16 * 1024,  # headers: 16 KiB at most
                                ssl_certfile=self.tls[0] if self.tls else None,
                                ssl_keyfile=self.tls[1] if self.tls else None)
        self._uvicorn = server = uvicorn.Server(config)
        last_report = time.monotonic()

        def watch():
            nonlocal last_report
            while not self._stop.wait(0.5):
                failure = self.engine.failure()
                if failure:
                    self.crash = failure
                    server.should_exit = True
                    return
                write_json(state_file, self.state())
                self._flush_requests()
                if time.monotonic() - last_report >= self.report_every:
                    last_report = time.monotonic()
                    self._report()

        write_json(state_file, self.state())
        watcher = threading.Thread(target=watch, name="serve-watch", daemon=True)
        watcher.start()
        if on_ready:
            on_ready(self)
        # uvicorn catches SIGINT/SIGTERM to shut down gracefully, then raises the signal again through the handler
        # that was there before: for SIGTERM that must be one that unwinds (the default would kill this process
        # before the engine is stopped and the counts reported), as SIGINT's KeyboardInterrupt does.
        import signal

        def unwind(signum, frame):
            raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, unwind)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # Ctrl-C or SIGTERM: a normal stop, reported below
        finally:
            self._stop.set()
            watcher.join(timeout=5)
            self.engine.stop()
            sock.close()
            state_file.unlink(missing_ok=True)
            self._report()
            summary = self.usage.snapshot()
            audit.record("serve.stop", details={"model": self.plan.name, "host": self.host, "port": self.port,
                                                "reason": "engine failed" if self.crash else "stopped",
                                                "requests": sum(t["requests"] for t in summary["tenants"].values()),
                                                "denied": summary["denied"]})
        if self.crash:
            raise StageFailed(f"the server stopped because {self.crash}.")
        return {"url": self.url, **self.plan.describe, "usage": self.usage.snapshot()}

    def _limits(self) -> dict:
        from .limits import describe

        return describe(self.limits)

    def _flush_requests(self) -> None:
        """Each request since the last flush, in one audit entry (one fsync for many requests, off the
        request path): tenant, key id, client address, route, status, tokens; never text."""
        from ..trust import audit

        log = self.usage.take_log()
        if log:
            audit.record("serve.requests", details={"model": self.plan.name, "requests": log})

    def _report(self) -> None:
        from ..trust import audit

        self._flush_requests()
        pending, denied = self.usage.take_pending()
        for tenant, counts in sorted(pending.items()):
            audit.record("serve.usage", subjects={"tenant": tenant},
                         details={"tenant": tenant, "model": self.plan.name, **vars(counts)})
        if denied:
            audit.record("serve.denied", details={"model": self.plan.name, "requests": denied})

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True


# -- for the TUI: a server in its own process, found again through its state file --------------------------------

def launch(model: str, port: int = DEFAULT_PORT, parallel: int = 4, adapters: list[str] | None = None,
           host: str = "127.0.0.1", tls: tuple[str, str] | None = None):
    """Start `appliance serve` as a detached process (it outlives the TUI, as a training run does); its errors go
    to ``serve/launch.log`` (one sentence: no prompt or answer is ever printed). Returns the Popen."""
    import subprocess
    import sys

    from ..workspace import home
    from .keys import serve_dir

    log = serve_dir() / "launch.log"
    cmd = [sys.executable, "-m", "appliance.cli", "serve", model, "--port", str(port), "--parallel", str(parallel),
           "--host", host]
    if tls:
        cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    for item in adapters or []:
        cmd += ["--adapter", item]
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, env={**os.environ, "APPLIANCE_HOME": str(home())})


def launch_error() -> str:
    from .keys import serve_dir

    log = serve_dir() / "launch.log"
    lines = [line for line in (log.read_text(errors="replace").splitlines() if log.is_file() else []) if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "it exited without a word"


def stop(pid: int) -> None:
    """Stop one of this workspace's running servers (as Ctrl-C does: it reports its counts and ends)."""
    import signal

    if not any(int(s["pid"]) == pid for s in running()):
        raise NotFound(f"no server of this workspace runs as pid {pid}; `appliance serve status` lists them.")
    os.kill(pid, signal.SIGINT)
