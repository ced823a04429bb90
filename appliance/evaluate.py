"""Evaluation: the base model against the tuned one on the test split.

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
    from .convert import base_gguf

    run = runs.run_dir(run_id)
    recipe = runs.load_recipe(run_id)
    tuned_path = run / "gguf" / "model-f16.gguf"
    if not tuned_path.is_file():
        raise NotFound(f"run {run_id} has no f16 GGUF; run `appliance export {run_id}` first.")
    split = data.test_split(recipe.dataset_path())
    conversations = data.heldout(recipe, samples, split)
    structured = all(_json_object(c[-1]["content"]) is not None for c in conversations)
    metrics = GENERIC + (STRUCTURED if structured else ())
    pairs = data.load_pairs(recipe.dataset_path(), split)[:samples] if recipe.method == "dpo" else []
    start = recipe.dpo.from_run if pairs and recipe.dpo.from_run else None
    if start:
        # A DPO run is compared with the SFT model it started from, which is what DPO is meant to improve.
        base_path = runs.run_dir(start) / "gguf" / "model-f16.gguf"
        if not base_path.is_file():
            raise NotFound(f"run {run_id} started from run {start}, which has no f16 GGUF to compare with; run "
                           f"`appliance export {start}` first.")
        reference = f"SFT run {start}"
    else:
        emit(Event("stage", STAGE, f"converting base model {recipe.base_model} to GGUF (once)"))
        base_path, reference = base_gguf(recipe.base_model), f"base model {recipe.base_model}"
    report: dict = {"samples": len(conversations), "split": split, "metrics": list(metrics), "examples": [],
                    "reference": reference}
    if split != "test":
        report["note"] = (f"dataset {recipe.dataset_path().name} has no test split (imported before there was one): "
                          "its validation split, which also chose the checkpoint, serves as test; re-import it for "
                          "an honest test split")
    if pairs:
        report["metrics"].append("preference_accuracy")
        report["pairs"] = len(pairs)
    for name, path in (("base", base_path), ("tuned", tuned_path)):
        report[name] = answers(name, path, recipe, conversations, metrics, structured, max_tokens, report, emit)
        if pairs:
            report[name].update(preferences(name, path, recipe, pairs, emit))
    report["improved"] = [m for m in report["metrics"] if report["tuned"][m] > report["base"][m]]
    decisive = "preference_accuracy" if pairs else metrics[-1]
    report["tuned_beats_base"] = report["tuned"][decisive] > report["base"][decisive]
    write_json(run / "eval.json", {k: v for k, v in report.items() if k != "examples"})
    emit(Event("finished", STAGE, "evaluated", {k: report[k] for k in ("base", "tuned")}))
    return report


def answers(name, path, recipe, conversations, metrics, structured, max_tokens, report, emit) -> dict:
    """Greedy answers to the held-out prompts through llama.cpp, scored against the references."""
    from . import infer

    emit(Event("stage", STAGE, f"answering {len(conversations)} test prompts with the {name} model"))
    totals = Counter()
    with infer.load(path) as llm, step(f"answering held-out prompts with the {name} model"):
        for i, conversation in enumerate(conversations):
            msgs = with_system(conversation, recipe.system_prompt)
            prompt = infer.tokenize(llm, infer.render(llm, msgs[:-1], add_generation_prompt=True))
            answer = infer.generate(llm, prompt, max_tokens=max_tokens)["text"]
            totals.update(score(answer, msgs[-1]["content"], structured))
            if i < 3:
                report["examples"].append({"model": name, "index": i, "answer": answer})
            emit(Event("progress", STAGE, "", {"model": name, "done": i + 1, "total": len(conversations)}))
    return {m: totals[m] / len(conversations) for m in metrics}


def preferences(name, path, recipe, pairs, emit) -> dict:
    """Held-out preference accuracy: the share of pairs whose chosen answer the model finds more likely than the
    rejected one (summed log-probabilities of the answer's tokens, end-of-turn included), and the mean margin."""
    import numpy as np

    from . import infer

    emit(Event("stage", STAGE, f"scoring {len(pairs)} held-out preference pairs with the {name} model"))
    wins, margins = 0, []
    with infer.load(path, n_ctx=4096, logits_all=True) as llm, step(f"scoring preference pairs with the {name} model"):
        for pair in pairs:
            prompt = with_system(pair["prompt"], recipe.system_prompt)
            head = infer.tokenize(llm, infer.render(llm, prompt, add_generation_prompt=True))
            logps = []
            for answer in (pair["chosen"], pair["rejected"]):
                ids = infer.tokenize(llm, infer.render(llm, [*prompt, {"role": "assistant", "content": answer}],
                                                       add_generation_prompt=False))
                llm.reset()
                llm.eval(ids)
                # The answer's tokens, each predicted by the row before it: only those rows are normalised.
                rows = np.asarray(llm.scores[len(head) - 1: len(ids) - 1], dtype=np.float64)
                top = rows.max(-1, keepdims=True)
                logprobs = rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))
                logps.append(float(logprobs[np.arange(len(rows)), ids[len(head):]].sum()))
            wins += logps[0] > logps[1]
            margins.append(logps[0] - logps[1])
    return {"preference_accuracy": wins / len(pairs), "preference_margin": float(np.mean(margins))}


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
