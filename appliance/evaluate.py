"""Evaluation: the base model against the tuned one on the held-out split.

Both answer every held-out prompt greedily through llama.cpp from their f16
GGUFs (the base converted from its imported weights, the tuned one from the
run's export), rendered with the same chat template. Generic metrics apply to
any dataset (exact match, token F1); when the reference answers are JSON
objects, the structured ones apply too (valid JSON, exact key set, field
accuracy). The report goes to ``runs/<id>/eval.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from . import data, runs
from .chat_format import with_system
from .errors import NotFound
from .events import Emit, Event, ignore
from .native_crash import step
from .workspace import write_json

STAGE = "eval"
GENERIC = ("exact_match", "token_f1")
STRUCTURED = ("valid_json", "exact_keys", "field_accuracy")


def evaluate(run_id: str, samples: int = 48, max_tokens: int = 96, emit: Emit = ignore) -> dict:
    from . import infer
    from .convert import base_gguf

    run = runs.run_dir(run_id)
    recipe = runs.load_recipe(run_id)
    tuned_path = run / "gguf" / "model-f16.gguf"
    if not tuned_path.is_file():
        raise NotFound(f"run {run_id} has no f16 GGUF; run `appliance export {run_id}` first.")
    records = data.load_split(recipe.dataset_path(), "validation")[:samples]
    structured = all(_json_object(r["messages"][-1]["content"]) is not None for r in records)
    metrics = GENERIC + (STRUCTURED if structured else ())
    emit(Event("stage", STAGE, f"converting base model {recipe.base_model} to GGUF (once)"))
    base_path = base_gguf(recipe.base_model)
    report: dict = {"samples": len(records), "metrics": list(metrics), "examples": []}
    for name, path in (("base", base_path), ("tuned", tuned_path)):
        emit(Event("stage", STAGE, f"answering {len(records)} held-out prompts with the {name} model"))
        totals = Counter()
        with infer.load(path) as llm, step(f"answering held-out prompts with the {name} model"):
            for i, r in enumerate(records):
                msgs = with_system(r["messages"], recipe.system_prompt)
                prompt = infer.tokenize(llm, infer.render(llm, msgs[:-1], add_generation_prompt=True))
                answer = infer.generate(llm, prompt, max_tokens=max_tokens)["text"]
                scores = score(answer, msgs[-1]["content"], structured)
                totals.update(scores)
                if i < 3:
                    report["examples"].append({"model": name, "index": i, "answer": answer})
                emit(Event("progress", STAGE, "", {"model": name, "done": i + 1, "total": len(records)}))
        report[name] = {m: totals[m] / len(records) for m in metrics}
    report["improved"] = [m for m in metrics if report["tuned"][m] > report["base"][m]]
    report["tuned_beats_base"] = report["tuned"][metrics[-1]] > report["base"][metrics[-1]]
    write_json(run / "eval.json", {k: v for k, v in report.items() if k != "examples"})
    emit(Event("finished", STAGE, "evaluated", {k: report[k] for k in ("base", "tuned")}))
    return report


def score(prediction: str, reference: str, structured: bool) -> dict[str, float]:
    out = {"exact_match": float(_norm(prediction) == _norm(reference)), "token_f1": token_f1(prediction, reference)}
    if structured:
        ref, got = _json_object(reference), _json_object(prediction)
        if got is None:
            out.update(valid_json=0.0, exact_keys=0.0, field_accuracy=0.0)
        else:
            # Strict on purpose: a fixed shape is what downstream code relies on ("Nurse" is not "nurse").
            out.update(valid_json=1.0, exact_keys=float(set(got) == set(ref)),
                       field_accuracy=sum(1 for k in ref if k in got and got[k] == ref[k]) / max(len(ref), 1))
    return out


def token_f1(prediction: str, reference: str) -> float:
    p, r = _norm(prediction).split(), _norm(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
