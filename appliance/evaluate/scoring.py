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
            llm.reset()
            llm.eval(window)
            rows = np.asarray(llm.scores[first - s - 1: len(window) - 1], dtype=np.float32)
            for offset, row in enumerate(log_softmax(rows)):
                yield first + offset, row
            done = s + len(window)
        s += half


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
