"""What tenant isolation costs in `appliance serve`: the time to the first token of requests that share a long
prefix (a system prompt), with the gateway's per-tenant slots against llama-server's shared prompt cache.

Two patterns, each on both:

- **one tenant, a conversation**: a long system prompt and a history that grows by one turn per request, as a chat
  does. The gateway sends each request back to the slot holding the tenant's own cache, so this should cost
  nothing;
- **two tenants, the same system prompt**, alternating. llama-server alone reuses the system prompt one tenant
  left in a slot for the other (the leak of issue 26); the gateway recomputes it. This is the cost of isolation.

Printed side by side: median and p90 time to the first streamed token, in ms. The baseline is llama-server itself
on its Unix socket (cache on, as it ships), so the gateway's own latency is in our figures and not in the
baseline's.

    .venv/bin/python bench/serve_isolation.py [--gguf FILE] [--turns 12] [--system-words 400]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, machine
from serve_load import free_port, log, wait_ready

USER_TURNS = ["What does the policy say about travel?", "And for meals?", "Who approves exceptions?",
              "How long do approvals take?", "What if the manager is away?", "Is there a form?"]


def system_prompt(words: int) -> str:
    base = ("You are the assistant of the finance team. Answer from the expense policy: receipts are required above "
            "25 euros, travel is booked through the agency, meals are capped per day, and exceptions need a "
            "director's approval in writing. ").split()
    return " ".join(base[i % len(base)] for i in range(words))


def first_token(client, url: str, headers: dict, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json={**body, "stream": True, "max_tokens": 4, "temperature": 0},
                       headers=headers) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"HTTP {r.status_code}: {r.text[:200]}")
        elapsed = None
        for line in r.iter_lines():
            if elapsed is None and line.startswith("data: {") and '"content"' in line:
                elapsed = time.perf_counter() - start
    return elapsed if elapsed is not None else time.perf_counter() - start


def conversation(system: str, turns: int) -> list[list[dict]]:
    history = [{"role": "system", "content": system}]
    out = []
    for i in range(turns):
        history = history + [{"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]}]
        out.append(list(history))
        history = history + [{"role": "assistant", "content": "Noted; see section " + str(i + 2) + "."}]
    return out


def measure(send, system: str, turns: int, tenants: list) -> dict:
    chat = [send(tenants[0], {"model": "m", "messages": m}) for m in conversation(system, turns)]
    shared = []
    for i in range(turns):
        tenant = tenants[i % len(tenants)]
        question = {"role": "user", "content": f"Question {i}: {USER_TURNS[i % len(USER_TURNS)]}"}
        shared.append(send(tenant, {"model": "m", "messages": [{"role": "system", "content": system}, question]}))
    return {"chat": chat[1:], "shared": shared[1:]}  # the first request of each pattern fills an empty cache


def main() -> None:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf")
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--system-words", type=int, default=400)
    args = p.parse_args()
    from appliance.models import default_gguf
    from appliance.serve.engine import Engine

    gguf = args.gguf or str(default_gguf())
    system = system_prompt(args.system_words)
    home = tempfile.mkdtemp(prefix="appliance-bench-isolation-")
    env = {**os.environ, "APPLIANCE_HOME": home}
    keys = {t: json.loads(subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "keys", "create", "--tenant",
                                          t, "--json"], env=env, capture_output=True, text=True, check=True,
                                         cwd=ROOT).stdout)["key"] for t in ("acme", "globex")}
    port = free_port()
    name = os.path.basename(gguf).removesuffix(".gguf")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", gguf, "--port", str(port), "--parallel",
                             "2", "--ctx", "2048"], env=env, stdout=subprocess.DEVNULL, stderr=log(home, "serve"),
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    results = {}
    try:
        wait_ready(url, proc, {"Authorization": f"Bearer {keys['acme']}"})
        with httpx.Client(timeout=300) as c:
            def ours(tenant, body):
                return first_token(c, url + "/chat/completions", {"Authorization": f"Bearer {keys[tenant]}"},
                                   {**body, "model": name})

            results["isolated (appliance serve)"] = measure(ours, system, args.turns, ["acme", "globex"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    engine = Engine(gguf, parallel=2, ctx=2048)
    engine.start()
    try:
        # A fresh connection per request, as the gateway does: llama-server closes kept-alive ones at will.
        transport = httpx.HTTPTransport(uds=str(engine.socket), limits=httpx.Limits(max_keepalive_connections=0))
        with httpx.Client(transport=transport, base_url="http://engine", timeout=300) as raw:
            def shared(tenant, body):
                return first_token(raw, "/v1/chat/completions", {}, body)

            results["shared cache (llama-server alone)"] = measure(shared, system, args.turns, ["acme", "globex"])
    finally:
        engine.stop()

    print(f"machine: {machine()}")
    print(f"GGUF {os.path.basename(gguf)}, system prompt {args.system_words} words, {args.turns} requests per "
          "pattern, 2 slots, time to the first token (ms)")
    print(f"{'pattern':<34} {'server':<36} {'median':>8} {'p90':>8}")
    figures = {}
    for server, r in results.items():
        for pattern, label in (("chat", "one tenant, a growing conversation"),
                               ("shared", "two tenants, one system prompt")):
            xs = sorted(r[pattern])
            med, p90 = statistics.median(xs) * 1000, xs[int(0.9 * (len(xs) - 1))] * 1000
            figures.setdefault(pattern, {})[server] = {"median_ms": round(med, 1), "p90_ms": round(p90, 1)}
            print(f"{label:<34} {server:<36} {med:8.1f} {p90:8.1f}")
    out = ROOT / "bench" / "serve_isolation.json"
    out.write_text(json.dumps({"machine": machine(), "gguf": os.path.basename(gguf),
                               "system_words": args.system_words, "turns": args.turns,
                               "date": time.strftime("%Y-%m-%d"), "figures": figures}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
