"""Evaluation: the base model against the tuned one on the test split, with intervals.

Both answer every test prompt greedily through llama.cpp from their f16 GGUFs (the base converted from its
imported weights, the tuned one from the run's export), rendered with the same chat template, and both score the
reference answers (perplexity). Text metrics apply to any dataset (exact match, token F1, ROUGE-L, chrF, BLEU);
when the reference answers are JSON objects, the structured ones apply too (valid JSON, exact key set, field
accuracy). Every figure has its 95% bootstrap interval and every difference its paired one (``metrics``).
A forgetting check scores both on a general-ability set shipped with the project (``general``).
With ``judge``, a local model compares the two answers to each prompt in both orders (``judge``); the answers
are kept encrypted for a blind review by people (``review``). The report goes to ``runs/<id>/eval.json``
(figures only: no dataset text, no answers); a new evaluation starts a new set of reviews (the audit log keeps
the earlier tallies).
"""

from __future__ import annotations

from pathlib import Path

from .. import data, runs
from ..errors import NotFound
from ..events import Emit, Event, ignore
from ..native_crash import step
from ..workspace import read_json, write_json
from .names import better

STAGE = "eval"


GENERAL_ITEMS = 240  # the whole general-ability set


def evaluate(run_id: str, samples: int = 48, max_tokens: int = 96, judge: str | None = None,
             general: int = GENERAL_ITEMS, examples: int = 0, emit: Emit = ignore) -> dict:
    """``judge``: a GGUF path, run id or model id (``infer.resolve``) to compare the answers pairwise;
    ``general``: items of the forgetting check (0 skips it); ``examples``: test examples written side by side into
    ``eval.html`` (dataset text in plaintext: only when asked, and recorded in the audit log)."""
    from .. import infer
    from ..convert import base_gguf
    from ..trust import audit
    from . import metrics, review

    run = runs.run_dir(run_id)
    recipe = runs.load_recipe(run_id)
    tuned_path = run / "gguf" / "model-f16.gguf"
    if not tuned_path.is_file():
        raise NotFound(f"run {run_id} has no f16 GGUF; run `appliance export {run_id}` first.")
    split = data.test_split(recipe.dataset_path())
    conversations = data.heldout(recipe, samples, split)
    references = [c[-1]["content"] for c in conversations]
    structured = all(metrics.json_object(r) is not None for r in references)
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
    judge_path = infer.resolve(judge) if judge else None  # a wrong name fails before any work
    report: dict = {"run": run_id, "samples": len(conversations), "split": split, "reference": reference,
                    "examples": []}
    if split != "test":
        report["note"] = (f"dataset {recipe.dataset_path().name} has no test split (imported before there was one): "
                          "its validation split, which also chose the checkpoint, serves as test; re-import it for "
                          "an honest test split")
    if pairs:
        report["pairs"] = len(pairs)
    measures: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name, path in (("base", base_path), ("tuned", tuned_path)):
        answered = answer_and_score(name, path, recipe, conversations, pairs, max_tokens, emit)
        answers[name] = answered["answers"]
        measures[name] = metrics.text_measures(answered["answers"], references, structured)
        measures[name]["perplexity"] = metrics.perplexity(answered["nll"])
        if pairs:
            measures[name].update(preference_accuracy=metrics.mean([m > 0 for m in answered["margins"]]),
                                  preference_margin=metrics.mean(answered["margins"]))
        report["examples"] += [{"model": name, "index": i, "answer": a} for i, a in enumerate(answered["answers"][:3])]
    report["metrics"] = list(measures["tuned"])
    report.update({name: {m: v.value for m, v in measures[name].items()} for name in ("base", "tuned")})
    report["intervals"] = {name: {m: metrics.interval(v) for m, v in measures[name].items()}
                           for name in ("base", "tuned")}
    report["differences"] = {m: metrics.difference(measures["tuned"][m], measures["base"][m]) for m in report["metrics"]}
    report["improved"] = [m for m in report["metrics"] if better(m, report["tuned"][m], report["base"][m])]
    # beyond the noise: the paired difference's interval excludes zero (either way)
    report["significant"] = [m for m in report["metrics"]
                             if report["differences"][m][0] > 0 or report["differences"][m][1] < 0]
    decisive = "preference_accuracy" if pairs else ("field_accuracy" if structured else "token_f1")
    report["decisive"] = decisive
    report["tuned_beats_base"] = better(decisive, report["tuned"][decisive], report["base"][decisive])
    review.save_answers(run_id, recipe.dataset_path(), [
        {"prompt": c[:-1], "reference": r, "base": b, "tuned": t}
        for c, r, b, t in zip(conversations, references, answers["base"], answers["tuned"])])
    exported = read_json(run / "export.json") if (run / "export.json").is_file() else {}
    if exported.get("quality"):  # measured by export, on the same test split
        report["quants"] = exported["quality"]
    if general:
        from . import general as general_set

        report["forgetting"] = general_set.check(Path(base_path), tuned_path, general, emit, STAGE)
    if judge_path is not None:
        from .judge import judge as run_judge

        label = judge if judge_path.name == judge else f"{judge} ({judge_path.name})"
        report["judge"] = run_judge(judge_path, label, [c[:-1] for c in conversations], references,
                                    answers["base"], answers["tuned"], emit, STAGE)
        if judge_path.resolve() in (Path(base_path).resolve(), tuned_path.resolve()):
            report["judge"]["note"] = "the judge is one of the two models compared: it may favour its own answers"
    from . import html

    shown = [{"prompt": "\n".join(t["content"] for t in c[:-1] if t["role"] != "system"), "reference": r,
              "base": b, "tuned": t}
             for c, r, b, t in zip(conversations, references, answers["base"], answers["tuned"])][:examples]
    report["html"] = str(html.write(run_id, {k: v for k, v in report.items() if k != "examples"}, shown or None))
    write_json(run / "eval.json", {k: v for k, v in report.items() if k != "examples"})
    audit.record("eval", {"run": run_id}, {
        "html": report["html"], "examples_in_html": len(shown),
        "split": split, "samples": len(conversations), "reference": reference, "decisive": decisive,
        "base": report["base"][decisive], "tuned": report["tuned"][decisive],
        **({"judge": report["judge"]["model"], "judge_tally": report["judge"]["tally"]} if judge_path else {}),
        **({"general_base": report["forgetting"]["base"], "general_tuned": report["forgetting"]["tuned"],
            "forgetting": report["forgetting"]["forgetting"]} if general else {})})
    emit(Event("finished", STAGE, "evaluated", {k: report[k] for k in ("base", "tuned")}))
    return report


def answer_and_score(name, path, recipe, conversations, pairs, max_tokens, emit) -> dict:
    """In one load of the model through llama.cpp: greedy answers to the test prompts, the negative
    log-likelihood of each reference answer (for perplexity), and for each preference pair the margin of the
    chosen answer's summed log-probability over the rejected one's (end-of-turn included)."""
    from .. import infer
    from ..chat_format import with_system
    from .scoring import N_CTX, answer_logprob

    emit(Event("stage", STAGE, f"answering {len(conversations)} test prompts with the {name} model"))
    answers, nll, margins = [], [], []
    with infer.load(path, n_ctx=N_CTX, logits_all=True) as llm, step(f"answering test prompts with the {name} model"):
        for i, conversation in enumerate(conversations):
            msgs = with_system(conversation, recipe.system_prompt)
            prompt = infer.tokenize(llm, infer.render(llm, msgs[:-1], add_generation_prompt=True))
            answers.append(infer.generate(llm, prompt, max_tokens=max_tokens)["text"])
            logprob, tokens = answer_logprob(llm, conversation[:-1], conversation[-1]["content"], recipe.system_prompt)
            nll.append((-logprob, tokens))
            emit(Event("progress", STAGE, "", {"model": name, "done": i + 1, "total": len(conversations)}))
        if pairs:
            emit(Event("stage", STAGE, f"scoring {len(pairs)} test preference pairs with the {name} model"))
            for pair in pairs:
                chosen, _ = answer_logprob(llm, pair["prompt"], pair["chosen"], recipe.system_prompt)
                rejected, _ = answer_logprob(llm, pair["prompt"], pair["rejected"], recipe.system_prompt)
                margins.append(chosen - rejected)
    return {"answers": answers, "nll": nll, "margins": margins}
