"""The forgetting check: general ability before and after fine-tuning, on a set shipped with the project.

Fine-tuning on a narrow task can cost a model what it could do before ("catastrophic forgetting"). The set is
240 multiple-choice items from six BIG-Bench Hard tasks (``general/README.md``: source, selection, licences),
offline. Each item is scored the way lm-evaluation-harness scores multiple choice: the model's log-probability
of each allowed answer after the question, through llama.cpp; the most likely one is the model's choice. Base
and tuned answer the same items; the report warns when the tuned model's accuracy falls below the base's by
more than the noise, i.e. when the paired 95% interval of the difference lies wholly below zero. The base's
scores are cached beside its GGUF (keyed by the file's size and time and the set's digest): a public benchmark's
scores, no user data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..events import Emit, Event, ignore
from ..native_crash import step

SET = Path(__file__).parent / "general" / "bbh-240.jsonl"
SOURCE = "BIG-Bench Hard (MIT; from BIG-bench, Apache-2.0): 6 tasks x 40 items"


def items(limit: int | None = None) -> list[dict]:
    """The set's items, the same subset for every model: every task in turn (round robin) up to ``limit``."""
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines() if line]
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    ordered = [r for group in zip(*by_task.values()) for r in group]
    return ordered[:limit] if limit else ordered


def prompt_of(item: dict) -> list[dict]:
    return [{"role": "user", "content": f"{item['input']}\n\nAnswer with {' or '.join(item['choices'])} only."}]


def answers(path: Path, label: str, chosen: list[dict], emit: Emit = ignore, stage: str = "eval") -> list[bool]:
    """Per item: whether the model's most likely choice is the target."""
    from .. import infer
    from .scoring import N_CTX, answer_logprob

    emit(Event("stage", stage, f"forgetting check: {len(chosen)} general-ability items with the {label} model"))
    right = []
    with infer.load(path, n_ctx=N_CTX, logits_all=True) as llm, step(f"general-ability items with the {label} model"):
        for i, item in enumerate(chosen):
            scores = {c: answer_logprob(llm, prompt_of(item), c, None)[0] for c in item["choices"]}
            right.append(max(scores, key=scores.get) == item["target"])
            emit(Event("progress", stage, "", {"model": f"{label} (general)", "done": i + 1, "total": len(chosen)}))
    return right


def cached_answers(path: Path, label: str, chosen: list[dict], emit: Emit = ignore, stage: str = "eval") -> list[bool]:
    """``answers``, cached (a base's do not change from run to run)."""
    from ..workspace import folder

    st = path.stat()
    digest = hashlib.sha256(SET.read_bytes() + json.dumps([c["input"] for c in chosen]).encode()).hexdigest()[:16]
    key = f"{st.st_size}-{st.st_mtime_ns}-{digest}"
    cache = folder("models") / ".scores" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["right"]
    except (OSError, ValueError):
        pass
    right = answers(path, label, chosen, emit, stage)
    from ..workspace import write_json

    try:
        cache.parent.mkdir(exist_ok=True)
        write_json(cache, {"key": key, "right": right})
    except OSError:  # a read-only models folder: no cache, same answer
        pass
    return right


def check(base_path: Path, tuned_path: Path, limit: int | None = None, emit: Emit = ignore,
          stage: str = "eval") -> dict:
    """Accuracy of base and tuned on the set (with intervals, per task too), the paired difference, and whether
    the tuned model forgot."""
    from . import metrics

    chosen = items(limit)
    base = cached_answers(base_path, "base", chosen, emit, stage)
    tuned = answers(tuned_path, "tuned", chosen, emit, stage)
    b, t = metrics.mean(base), metrics.mean(tuned)
    diff = metrics.difference(t, b)
    tasks = {}
    for name in dict.fromkeys(c["task"] for c in chosen):
        idx = [i for i, c in enumerate(chosen) if c["task"] == name]
        tasks[name] = {"items": len(idx), "base": sum(base[i] for i in idx) / len(idx),
                       "tuned": sum(tuned[i] for i in idx) / len(idx)}
    forgot = diff[1] < 0
    out = {"set": SOURCE, "items": len(chosen),
           "chance": sum(1 / len(c["choices"]) for c in chosen) / len(chosen),
           "base": b.value, "tuned": t.value, "intervals": {"base": metrics.interval(b), "tuned": metrics.interval(t)},
           "difference": diff, "forgetting": forgot, "tasks": tasks}
    if forgot:
        out["warning"] = (f"forgetting: general-ability accuracy fell from {b.value:.1%} to {t.value:.1%}, beyond the "
                          f"noise (difference {diff[0] * 100:+.1f} to {diff[1] * 100:+.1f} points); mix general data "
                          "into training (dataset weights), lower the learning rate or train fewer steps")
        emit(Event("warning", stage, out["warning"]))
    return out
