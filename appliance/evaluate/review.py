"""A blind A/B review by people: the guides' "manual expert scoring", beside the judge's advisory verdicts.

``appliance eval`` keeps the base and tuned answers to the test prompts for this, encrypted with the dataset's
key (``runs/<id>/eval-answers.c2sp``, bound to the dataset and the run: crypto-shredding the dataset makes them
unreadable too; a plain-folder dataset, plaintext by the user's choice, gets plain ``eval-answers.jsonl``). A
review shows a reviewer each prompt with its reference and the two answers as A and B, sides drawn at random and
items in random order, so the reviewer cannot tell which model wrote which; identical answers count as ties
without being shown. The tally (who, tuned wins, ties, base wins, skipped) joins ``eval.json`` and the audit log;
which answer won which item stays in memory.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from .. import data, runs
from ..errors import NotFound
from ..workspace import read_json, write_json

SEALED, PLAIN = "eval-answers.c2sp", "eval-answers.jsonl"
CHOICES = ("a", "b", "tie", "skip")


def _name(run_id: str) -> str:
    return f"eval-answers/{run_id}"


def save_answers(run_id: str, dataset: Path, records: list[dict]) -> Path:
    """The answers of both models to the test prompts ({prompt, reference, base, tuned} each), for a review."""
    run = runs.run_dir(run_id)
    if data.is_encrypted(dataset):
        from ..trust import store
        from ..trust.keys import vault

        (run / PLAIN).unlink(missing_ok=True)
        store.write_derived(vault(), dataset.name, run / SEALED, _name(run_id), records)
        return run / SEALED
    import json

    from ..workspace import write_atomic

    write_atomic(run / PLAIN, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return run / PLAIN


def load_answers(run_id: str) -> list[dict]:
    import json

    run = runs.run_dir(run_id)
    if (run / SEALED).is_file():
        from ..trust import store
        from ..trust.keys import vault

        dataset = runs.load_recipe(run_id).dataset_path()
        return list(store.read_derived(vault(), dataset.name, run / SEALED, _name(run_id)))
    if (run / PLAIN).is_file():
        return [json.loads(line) for line in (run / PLAIN).read_text(encoding="utf-8").splitlines() if line]
    raise NotFound(f"run {run_id} has no answers to review; run `appliance eval {run_id}` first.")


class Review:
    """One reviewer's pass over a run's test answers: ``current()`` shows an item blind, ``vote()`` answers it,
    ``save()`` records the tally."""

    def __init__(self, run_id: str, reviewer: str, limit: int | None = None, seed: int | None = None):
        self.run_id, self.reviewer = run_id, reviewer
        rng = random.Random(seed)
        items = load_answers(run_id)
        self.identical = sum(1 for it in items if _same(it["base"], it["tuned"]))
        shown = [it for it in items if not _same(it["base"], it["tuned"])]
        rng.shuffle(shown)
        self.items = [(it, rng.random() < 0.5) for it in shown[:limit]]  # (item, tuned shown as A?)
        self.votes: list[str] = []  # "tuned", "base", "tie" or "skip", per item shown so far

    @property
    def done(self) -> bool:
        return len(self.votes) >= len(self.items)

    def current(self) -> dict | None:
        if self.done:
            return None
        item, tuned_a = self.items[len(self.votes)]
        a, b = (item["tuned"], item["base"]) if tuned_a else (item["base"], item["tuned"])
        return {"number": len(self.votes) + 1, "total": len(self.items), "prompt": item["prompt"],
                "reference": item["reference"], "a": a, "b": b}

    def vote(self, choice: str) -> None:
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}")
        if self.done:
            return
        _, tuned_a = self.items[len(self.votes)]
        self.votes.append({"a": "tuned" if tuned_a else "base", "b": "base" if tuned_a else "tuned"}.get(choice, choice))

    def tally(self) -> dict:
        from . import metrics

        counted = [v for v in self.votes if v != "skip"] + ["tie"] * self.identical
        score = metrics.win_rate(counted) if counted else None
        return {"reviewer": self.reviewer, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "items": len(counted), "tuned_wins": counted.count("tuned"), "ties": counted.count("tie"),
                "base_wins": counted.count("base"), "skipped": self.votes.count("skip"),
                "identical": self.identical, "unreviewed": len(self.items) - len(self.votes),
                "win_rate": score.value if score else None,
                "win_rate_interval": metrics.interval(score) if score else None}

    def save(self) -> dict:
        """The tally into ``eval.json`` (beside earlier reviews) and the audit log; returns it."""
        from ..trust import audit

        tally = self.tally()
        path = runs.run_dir(self.run_id) / "eval.json"
        report = read_json(path) if path.is_file() else {}
        report.setdefault("reviews", []).append(tally)
        write_json(path, report)
        if report.get("metrics"):  # the page shows the tally too (rewritten without examples)
            from . import html

            html.write(self.run_id, report)
        audit.record("eval.review", {"run": self.run_id}, {k: v for k, v in tally.items() if k != "at"})
        return tally


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())
