"""Generation throughput: `appliance ask` vs raw llama-cpp-python on the same GGUF, threads and prompt, for the
llama.cpp CPU variant chosen at run time and for the most basic one (plain x86-64: what an old CPU gets).

Both decode greedily; the figure is generated tokens per second after the first token (prompt processing
excluded), the median of several repeats, plus the prompt's batch decode in tokens per second. The GGUF is the
base model's f16 export and its q8_0 quantization. Each variant runs in its own child process (a process loads
one CPU backend).

    .venv/bin/python bench/ask_throughput.py [--variants best,x64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import ROOT, machine, scratch_workspace

REPEATS, MAX_TOKENS = 3, 128
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PREFILL = ("The quick brown fox jumps over the lazy dog while the keeper counts the ships. " * 40)


def raw(path, threads: int) -> dict:
    from appliance.llama_runtime import lib  # the same library; only its CPU backend loaded first

    llama_cpp = lib()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads, verbose=False)
    rates = []
    try:
        for _ in range(REPEATS):
            first = None
            n = 0
            for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
                                                    temperature=0.0, stream=True):
                if chunk["choices"][0]["delta"].get("content"):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
            rates.append((n - 1) / (time.perf_counter() - first))
        ids = llm.tokenize(PREFILL.encode(), add_bos=False)[:512]
        prefill = []
        for _ in range(REPEATS):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            prefill.append(len(ids) / (time.perf_counter() - t))
    finally:
        llm.close()
    return {"decode": statistics.median(rates), "prefill": statistics.median(prefill)}


def ours(path, threads: int) -> float:
    from appliance.infer import ask

    return statistics.median(ask(str(path), PROMPT, max_tokens=MAX_TOKENS, threads=threads)["tokens_per_s"]
                             for _ in range(REPEATS))


def child(f16: str, q8: str, threads: int) -> None:
    """One CPU variant: print its figures as one JSON line."""
    from appliance.llama_runtime import describe

    out = {"variant": describe()["variant"]}
    for name, path in (("f16", f16), ("q8_0", q8)):
        out[name] = {"ask": ours(path, threads), **raw(path, threads)}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="best,x64", help="CPU variants to compare (best: chosen at run time)")
    ap.add_argument("--child", nargs=3, metavar=("F16", "Q8", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    home = scratch_workspace()
    from appliance import demo
    from appliance.convert import base_gguf
    from appliance.export import quantize
    from appliance.llama_runtime import ENV_FORCE

    f16 = base_gguf(demo.MODEL_ID)
    q8 = f16.with_name("model-q8_0.gguf")
    if not q8.is_file():
        quantize(f16, q8, "q8_0")
    threads = os.cpu_count()
    print(f"generation throughput, SmolLM2-135M-Instruct, greedy, {MAX_TOKENS} tokens, {threads} threads, {machine()}")
    print(f"{'CPU variant':16}{'GGUF':7}{'ask tok/s':>11}{'raw tok/s':>11}{'prompt tok/s (512, one batch)':>31}")
    for variant in args.variants.split(","):
        env = {**os.environ, "APPLIANCE_HOME": str(home)}
        env.pop(ENV_FORCE, None)
        if variant != "best":
            env[ENV_FORCE] = variant
        proc = subprocess.run([sys.executable, __file__, "--child", str(f16), str(q8), str(threads)], env=env,
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{variant:16}failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        label = f"{variant} ({r['variant']})" if variant == "best" else variant
        for name in ("f16", "q8_0"):
            f = r[name]
            print(f"{label:16}{name:7}{f['ask']:>11.1f}{f['decode']:>11.1f}{f['prefill']:>31.1f}")


if __name__ == "__main__":
    main()
