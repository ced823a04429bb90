"""Log-probabilities of given answers under a GGUF model, through llama.cpp: perplexity on reference answers,
preference pairs (chosen vs rejected), multiple-choice items, and the full next-token distributions that the
per-quantization KL divergence compares.

A model is loaded with ``logits_all`` so that one evaluation of prompt + answer yields the distribution at every
position. An input longer than the context is scored the llama-perplexity way: windows of ``n_ctx`` tokens half
overlapping, each scoring only its second half (its first half is context), the first window everything; every
answer token is scored exactly once.
"""

from __future__ import annotations

import numpy as np

from ..chat_format import with_system

N_CTX = 2048


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    top = rows.max(-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))


def distributions(llm, ids: list[int], start: int, n_ctx: int = N_CTX):
    """(position, log-softmax row predicting ids[position]) for every position from ``start`` (>= 1) on."""
    half, done = n_ctx // 2, start
    s = 0
    while done < len(ids) and s < len(ids):
        window = ids[s:s + n_ctx]
        first = max(done, s + (half if s else 1))
        if first < s + len(window):
            _eval(llm, window)
            rows = np.asarray(llm.scores[first - s - 1: len(window) - 1], dtype=np.float32)
            for offset, row in enumerate(log_softmax(rows)):
                yield first + offset, row
            done = s + len(window)
        s += half


def _eval(llm, ids: list[int]) -> None:
    """Evaluate ``ids`` from position 0, reusing the KV cache of the longest prefix already evaluated: the choices
    of one question, the verdicts of one judgement and the two answers of a pair share their prompt, which is
    evaluated once (llama-cpp-python's eval drops the cache past ``n_tokens``; logit rows of the prefix stay)."""
    n = min(llm.n_tokens, len(ids))
    current = llm.input_ids[:n]
    common = 0
    while common < n and current[common] == ids[common]:
        common += 1
    common = min(common, len(ids) - 1)  # evaluate at least the last token again: its row is the one read last
    llm.n_tokens = common
    llm.eval(ids[common:])


def answer_ids(llm, prompt: list[dict], answer: str, system: str | None) -> tuple[list[int], int]:
    """The token ids of prompt + answer rendered with the GGUF's template (end of turn included), and where
    the answer starts."""
    from .. import infer

    messages = with_system(prompt, system)
    head = infer.tokenize(llm, infer.render(llm, messages, add_generation_prompt=True))
    ids = infer.tokenize(llm, infer.render(llm, [*messages, {"role": "assistant", "content": answer}],
                                           add_generation_prompt=False))
    return ids, len(head)


def answer_logprob(llm, prompt: list[dict], answer: str, system: str | None) -> tuple[float, int]:
    """Summed log-probability of the answer's tokens (end of turn included) after the prompt, and their count."""
    ids, start = answer_ids(llm, prompt, answer, system)
    total = sum(float(row[ids[pos]]) for pos, row in distributions(llm, ids, start))
    return total, len(ids) - start
