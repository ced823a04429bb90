"""Generation throughput: `appliance ask` vs raw llama-cpp-python on the same GGUF, threads and prompt.

Both decode greedily; the figure is generated tokens per second after the first token (prompt processing
excluded), the median of several repeats. The GGUF is the base model's f16 export and its q8_0 quantization.
"""

from __future__ import annotations

import os
import statistics
import time

from _common import machine, scratch_workspace

REPEATS, MAX_TOKENS = 3, 128
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def raw(path, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False)
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
    finally:
        llm.close()
    return statistics.median(rates)


def ours(path, threads: int) -> float:
    from appliance.infer import ask

    return statistics.median(ask(str(path), PROMPT, max_tokens=MAX_TOKENS, threads=threads)["tokens_per_s"]
                             for _ in range(REPEATS))


def main() -> None:
    scratch_workspace()
    from appliance import demo
    from appliance.export import base_gguf, quantize

    f16 = base_gguf(demo.MODEL_ID)
    q8 = f16.with_name("model-q8_0.gguf")
    if not q8.is_file():
        quantize(f16, q8, "q8_0")
    threads = os.cpu_count()
    print(f"generation throughput, SmolLM2-135M-Instruct, greedy, {MAX_TOKENS} tokens, {threads} threads, {machine()}")
    print(f"{'GGUF':8}{'appliance ask tok/s':>22}{'raw llama-cpp-python tok/s':>30}")
    for name, path in (("f16", f16), ("q8_0", q8)):
        print(f"{name:8}{ours(path, threads):>22.1f}{raw(path, threads):>30.1f}")


if __name__ == "__main__":
    main()
