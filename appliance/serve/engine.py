"""The engine behind `appliance serve`: llama.cpp's own ``llama-server``, started, watched and stopped here.

Why llama-server and not llama-cpp-python's server (``bench/serve_load.py`` measures both on the same GGUF; the
README has the figures): llama-server batches the requests of its ``-np`` slots continuously, so several users
are answered together, while llama-cpp-python's server answers one request at a time and by default cuts a
streaming answer short when another request arrives. llama-server also loads several LoRA adapters at start and
applies them per request, which is how one resident base serves each tenant its own adapter.

It is built by packaging/llama-wheel.sh in the same build as the bindings (same llama.cpp commit, same portable
flags, the CPU kernels chosen at run time) and lives beside them in ``llama_cpp/lib``.

It listens on a Unix socket in a private folder (0700) and never on TCP: the only way in is the appliance's
gateway (``gateway.py``), which checks keys, picks the tenant's adapter and counts tokens. It is started with:

- ``--jinja``: the chat template stored in the GGUF, rendered as `appliance ask` renders it; end-of-generation
  tokens from the GGUF's vocabulary;
- ``--cache-ram 0``: no prompt cache shared across slots (its entries are matched by tokens alone, and a tenant
  must never resume from a KV cache computed through another tenant's adapter; within a slot llama-server
  clears the cache itself when the adapters change);
- ``--no-slots``, ``--no-webui``: no endpoint that shows prompts being processed, no web page;
- ``--lora-init-without-apply``: every adapter loaded at scale 0; each request names its own.

Its output stays in memory (the last lines, for a crash report); nothing is written to disk.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..errors import InvalidInput, StageFailed

BINARY = "llama-server"


def binary() -> Path:
    from ..llama_runtime import lib_dir

    path = lib_dir() / BINARY
    if not path.is_file():
        raise InvalidInput(f"{path} is missing: this llama-cpp-python was not built by packaging/llama-wheel.sh; "
                           "run scripts/setup.sh again.")
    if not os.access(path, os.X_OK):
        raise InvalidInput(f"{path} is not executable; run scripts/setup.sh again (or chmod +x it).")
    return path


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the appliance's process ends, however it ends
    (even SIGKILL), so no llama-server outlives its gateway."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Engine:
    """One llama-server process on a private Unix socket."""

    def __init__(self, gguf: Path, adapters: list[Path] | None = None, parallel: int = 4, ctx: int = 2048,
                 threads: int | None = None, alias: str = "model"):
        if parallel < 1:
            raise InvalidInput(f"--parallel must be at least 1; got {parallel}.")
        if ctx < 64:
            raise InvalidInput(f"--ctx must be at least 64 tokens per slot; got {ctx}.")
        self.gguf, self.adapters, self.parallel, self.ctx = Path(gguf), [Path(a) for a in adapters or []], parallel, ctx
        self.threads, self.alias = threads, alias
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.stopping = False
        self.slot_ctx = ctx
        self._dir: Path | None = None

    @property
    def socket(self) -> Path:
        assert self._dir is not None
        return self._dir / "engine.sock"

    def command(self) -> list[str]:
        cmd = [str(binary()), "--model", str(self.gguf), "--host", str(self.socket), "--port", "8080",
               "--parallel", str(self.parallel), "--ctx-size", str(self.ctx * self.parallel), "--jinja",
               "--cache-ram", "0", "--no-slots", "--no-webui", "--alias", self.alias]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        for adapter in self.adapters:
            cmd += ["--lora", str(adapter)]
        if self.adapters:
            cmd.append("--lora-init-without-apply")
        return cmd

    def start(self, timeout: float = 300.0) -> None:
        """Start it and wait until it answers /health; a failure to start is reported with its last words."""
        for path in [self.gguf, *self.adapters]:
            if not path.is_file():
                raise InvalidInput(f"{path} does not exist.")
        self._dir = Path(tempfile.mkdtemp(prefix="appliance-engine-"))  # 0700: only this user reaches the socket
        cmd = self.command()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=self._dir, start_new_session=True, preexec_fn=_die_with_parent)
        threading.Thread(target=self._drain, name="engine-output", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            failure = self.failure()
            if failure:
                self._cleanup()
                raise StageFailed(f"llama-server did not start: {failure}")
            if self.socket.exists() and self._health() == 200:
                self.slot_ctx = self._slot_ctx()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise StageFailed(f"llama-server did not answer within {timeout:.0f} s; its last lines: "
                                  f"{self.last_words() or 'none'}")
            time.sleep(0.1)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip())

    def _slot_ctx(self) -> int:
        """Each slot's context as the engine sized it: ``--ctx`` unless the model was trained on fewer tokens,
        which llama-server takes as the cap (the gateway checks prompts against this figure)."""
        import json

        status, body = self._get("/props")
        try:
            return int(json.loads(body)["default_generation_settings"]["n_ctx"]) if status == 200 else self.ctx
        except (ValueError, KeyError, TypeError):
            return self.ctx

    def _health(self) -> int | None:
        return self._get("/health")[0]

    def _get(self, path: str) -> tuple[int | None, bytes]:
        import http.client
        import socket

        class UnixConnection(http.client.HTTPConnection):
            def connect(conn):
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(2.0)
                conn.sock.connect(str(self.socket))

        conn = UnixConnection("engine")
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return None, b""
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_words(self) -> str:
        return " | ".join(line for line in list(self.lines)[-6:] if line.strip())

    def failure(self) -> str | None:
        """None while it runs (or once stopped on purpose); else how it ended, in one sentence."""
        if self.proc is None or self.stopping:
            return None
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        words = self.last_words()
        return f"llama-server {how}" + (f"; its last lines: {words}" if words else "")

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
