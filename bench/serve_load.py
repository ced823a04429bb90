"""Serving under load: `appliance serve` (gateway + llama-server) against raw llama-cpp-python's own server
(`python -m llama_cpp.server`, its [server] extra, defaults as shipped) on the same GGUF, on loopback.

For each number of concurrent clients (1, 4, 16), each client sends streaming chat completions back to back
for a fixed time (greedy, the same prompts, ``max_tokens`` each, end-of-generation ignored so every answer has
the same length on both servers). Printed side by side: requests/s, generated tokens/s (all clients together),
p50 and p95 latency of a whole request, time to first token, errors, and cut-off answers (a stream that ended
without a finish reason, or with fewer tokens than asked: what llama-cpp-python's server does to an answer
when another request arrives, its ``interrupt_requests``).

    .venv/bin/python bench/serve_load.py [--clients 1,4,16] [--seconds 20] [--max-tokens 48] [--parallel 4]
        [--gguf FILE]   (default: the embedded SmolLM2-135M-Instruct GGUF)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import ROOT, machine

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
           "List three uses of copper and say why.", "Describe a market in the morning."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(home: str, name: str):
    """A server's output goes to a file (a pipe nobody reads would fill and stall a chatty server)."""
    return open(os.path.join(home, f"{name}.log"), "wb")


def wait_ready(url: str, proc: subprocess.Popen, headers: dict, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}; its output is in {proc.args[0]}'s log")
        try:
            if httpx.get(url + "/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def start_ours(gguf: str, parallel: int, ctx: int, home: str) -> tuple[subprocess.Popen, str, dict]:
    env = {**os.environ, "APPLIANCE_HOME": home}
    key = json.loads(subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "keys", "create", "--tenant",
                                     "bench", "--json"], env=env, capture_output=True, text=True, check=True,
                                    cwd=ROOT).stdout)["key"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", gguf, "--port", str(port), "--parallel",
                             str(parallel), "--ctx", str(ctx)], env=env, stdout=subprocess.DEVNULL,
                            stderr=log(home, "serve"), cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {key}"}


def start_raw(gguf: str, ctx: int, home: str) -> tuple[subprocess.Popen, str, dict]:
    # llama-cpp-python's server as shipped; only llama.cpp's CPU backend is loaded first, as the appliance's
    # portable build needs (llama_runtime.lib), so both servers run the same kernels.
    port = free_port()
    code = ("import sys, runpy; from appliance.llama_runtime import lib; lib(); "
            f"sys.argv = ['llama_cpp.server', '--model', {gguf!r}, '--host', '127.0.0.1', '--port', '{port}', "
            f"'--n_ctx', '{ctx}', '--model_alias', 'model']; runpy.run_module('llama_cpp.server', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "APPLIANCE_HOME": home},
                            stdout=subprocess.DEVNULL, stderr=log(home, "raw"), cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}/v1", {}


def one_request(client, url: str, headers: dict, model: str, prompt: str, max_tokens: int) -> dict:
    import httpx

    start = time.perf_counter()
    first, tokens, finish = None, 0, None
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"HTTP {r.status_code}: {r.text[:160]}"}
        try:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        tokens += 1
                        first = first or time.perf_counter()
                    finish = choice.get("finish_reason") or finish
        except httpx.HTTPError:  # the answer was accepted and then broken off: a cut-off answer, not a refusal
            finish = None
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "cut": finish is None or tokens < max_tokens}


def load(url: str, headers: dict, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            n = 0
            while time.perf_counter() < stop_at:
                try:
                    r = one_request(client, url, headers, model, PROMPTS[(i + n) % len(PROMPTS)], max_tokens)
                except (httpx.HTTPError, ValueError) as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:200]}
                n += 1
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(ok),
            "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "ttft_p50_s": statistics.median([r["ttft"] for r in ok]) if ok else float("nan"),
            "errors": len(results) - len(ok), "cut_off": sum(r["cut"] for r in ok),
            "error_kinds": sorted({r["error"] for r in results if "error" in r})[:5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--parallel", type=int, default=4, help="llama-server slots")
    ap.add_argument("--ctx", type=int, default=1024, help="context per request")
    ap.add_argument("--gguf")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    home = tempfile.mkdtemp(prefix="appliance-bench-serve-")
    os.environ["APPLIANCE_HOME"] = home
    from appliance.models import default_gguf

    gguf = args.gguf or str(default_gguf())
    levels = [int(c) for c in args.clients.split(",")]
    print(f"serving under load: {os.path.basename(gguf)}, streaming chat, {args.max_tokens} tokens per answer, "
          f"{args.seconds:.0f} s per level, loopback; {machine()}")
    figures = {}
    for name, start, model in (("appliance serve", lambda: start_ours(gguf, args.parallel, args.ctx, home),
                                os.path.basename(gguf).removesuffix(".gguf")),
                               ("llama-cpp-python", lambda: start_raw(gguf, args.ctx * args.parallel, home), "model")):
        proc, url, headers = start()
        try:
            wait_ready(url, proc, headers)
            load(url, headers, model, 1, 3.0, 8)  # warm-up: the first request pays for page faults
            figures[name] = [load(url, headers, model, c, args.seconds, args.max_tokens) for c in levels]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    head = f"{'clients':>7}  {'server':18}{'req/s':>7}{'tok/s':>8}{'p50 s':>7}{'p95 s':>7}{'TTFT s':>8}{'errors':>7}{'cut off':>8}"
    print(head)
    for i, c in enumerate(levels):
        for name in figures:
            f = figures[name][i]
            print(f"{c:>7}  {name:18}{f['requests_per_s']:>7.2f}{f['tokens_per_s']:>8.1f}{f['p50_s']:>7.2f}"
                  f"{f['p95_s']:>7.2f}{f['ttft_p50_s']:>8.2f}{f['errors']:>7}{f['cut_off']:>8}")
    for name, rows in figures.items():
        by = {f["clients"]: f for f in rows}
        if 1 in by and 4 in by and by[1]["tokens_per_s"]:
            print(f"{name}: 4 clients give {by[4]['tokens_per_s'] / by[1]['tokens_per_s']:.2f}x one client's tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gguf": os.path.basename(gguf), "machine": machine(), "max_tokens": args.max_tokens,
                       "seconds": args.seconds, "parallel": args.parallel, "figures": figures}, f, indent=2)


if __name__ == "__main__":
    main()
