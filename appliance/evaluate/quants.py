"""Quality per quantization: what each exported GGUF loses against the f16 one, on the test split.

For every exported file: the perplexity of the test references' answer tokens, and, as llama-perplexity's
``--kl-divergence`` does, the mean KL divergence of its next-token distributions from the f16 file's at the same
positions (0 for f16 itself) and the share of positions where both pick the same top token; each with its 95%
interval over the examples. With the file sizes, this is what picks the quantization for an edge box of a given
size (``best_fit``; ``bundle --quant auto --max-size``). The f16 distributions are held in memory (float32, at
most ``MAX_POSITIONS`` answer tokens), never on disk.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..events import Emit, Event, ignore
from ..native_crash import step

MAX_POSITIONS = 2048
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def quality(files: dict[str, Path], conversations: list[list[dict]], system: str | None, emit: Emit = ignore,
            stage: str = "export") -> dict[str, dict]:
    """{quant: {bytes, perplexity, perplexity_interval, kl_divergence, kl_interval, same_top1}} for ``files``
    (which must include "f16"), on the answers of ``conversations``."""
    from .. import infer
    from . import metrics
    from .scoring import N_CTX, answer_ids, distributions

    order = ["f16", *[q for q in files if q != "f16"]]
    reference: list[list[np.ndarray]] = []  # per example, the f16 rows of its answer tokens
    out = {}
    for q in order:
        emit(Event("stage", stage, f"quality of {q} on {len(conversations)} test answers (perplexity, KL vs f16)"))
        nll, kl, same = [], [], []
        kept = 0
        with infer.load(files[q], n_ctx=N_CTX, logits_all=True) as llm, step(f"scoring {files[q].name}"):
            for i, conv in enumerate(conversations):
                ids, start = answer_ids(llm, conv[:-1], conv[-1]["content"], system)
                rows = [(pos, row.astype(np.float32)) for pos, row in distributions(llm, ids, start)]
                nll.append((-sum(float(r[ids[p]]) for p, r in rows), len(rows)))
                if q == "f16":
                    take = rows if kept + len(rows) <= MAX_POSITIONS else []
                    kept += len(take)
                    reference.append([r for _, r in take])
                elif i < len(reference) and reference[i]:
                    ref = np.stack(reference[i])
                    got = np.stack([r for _, r in rows])
                    kl.append((float((np.exp(ref) * (ref - got)).sum()), len(ref)))
                    same.append((float((ref.argmax(-1) == got.argmax(-1)).sum()), len(ref)))
        ppl = metrics.perplexity(nll)
        entry = {"bytes": files[q].stat().st_size, "perplexity": ppl.value, "perplexity_interval": metrics.interval(ppl)}
        if q == "f16":
            entry.update(kl_divergence=0.0, kl_interval=[0.0, 0.0], same_top1=1.0)
        else:
            ratio = lambda s: s[0] / s[1] if s[1] else float("nan")  # noqa: E731
            k = metrics.Measure(np.asarray(kl, dtype=np.float64).reshape(-1, 2), ratio)
            t = metrics.Measure(np.asarray(same, dtype=np.float64).reshape(-1, 2), ratio)
            entry.update(kl_divergence=k.value, kl_interval=metrics.interval(k), same_top1=t.value)
        out[q] = entry
    return {q: out[q] for q in files}


def parse_size(text: str) -> int:
    """``2GB``, ``1.5GiB``, ``800MB``, ``500M`` -> bytes (decimal units for GB/MB, binary for GiB/MiB)."""
    from ..errors import InvalidInput

    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidInput(f"--max-size {text!r} is not a size; write e.g. 2GB, 1.5GiB or 800MB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


EDGE_SIZES_GIB = (0.5, 1, 2, 4, 8, 16)


def fits_by_size(quality_by_quant: dict[str, dict]) -> list[tuple[float, str]]:
    """(GiB, quantization) for edge boxes of common sizes, the best fit of each, where it changes."""
    fits: list[tuple[float, str]] = []
    for gib in EDGE_SIZES_GIB:
        pick = best_fit(quality_by_quant, int(gib * 2**30))
        if pick and (not fits or fits[-1][1] != pick):
            fits.append((gib, pick))
    return fits


def best_fit(quality_by_quant: dict[str, dict], max_bytes: int | None) -> str | None:
    """The quantization with the lowest KL divergence from f16 (then the smallest) whose file fits ``max_bytes``;
    None when none fits."""
    fitting = [(q["kl_divergence"], q["bytes"], name) for name, q in quality_by_quant.items()
               if max_bytes is None or q["bytes"] <= max_bytes]
    return min(fitting)[2] if fitting else None
