"""Scores of answers against reference answers, each with a 95% interval, so a small test set does not overclaim.

Every metric is kept as per-example sufficient statistics and a function from their sum to the value: a mean
(exact match, token F1, ROUGE-L, the JSON metrics) sums ``[value, 1]``; perplexity sums ``[negative
log-likelihood, tokens]``; BLEU and chrF sum sacrebleu's own n-gram statistics, so the corpus score is
sacrebleu's. The interval is a percentile bootstrap over examples (1,000 resamples, seeded): each resample sums
the statistics of the examples drawn and recomputes the value, which is what sacrebleu's own bootstrap does for
BLEU. A share of right/wrong answers (exact match, valid JSON...) gets the Wilson score interval instead: the
bootstrap of 0 right out of 48 is [0, 0], which claims certainty that 48 examples cannot give (Wilson: [0, 7.4%]). The difference between two models is bootstrapped paired (the same draw of examples for both), so it says
whether a change is larger than the noise of this test set.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

RESAMPLES = 1000
SEED = 0
GENERIC = ("exact_match", "token_f1", "rouge_l", "chrf", "bleu")
STRUCTURED = ("valid_json", "exact_keys", "field_accuracy")
# Non-spaced scripts (kana, CJK ideographs, hangul): a character is a token, as ROUGE and BLEU for them count.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKENS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


@dataclass
class Measure:
    """One model's score on one metric: per-example statistics (rows) and how their sum becomes the value."""

    stats: np.ndarray
    reduce: Callable[[np.ndarray], float]
    binary: bool = False  # a share of 0/1 outcomes: Wilson interval

    @property
    def value(self) -> float:
        return float(self.reduce(self.stats.sum(0)))


def mean(values) -> Measure:
    v = np.asarray(values, dtype=np.float64)
    return Measure(np.column_stack([v, np.ones(len(v))]), lambda s: s[0] / s[1] if s[1] else float("nan"),
                   binary=bool(len(v)) and bool(np.isin(v, (0.0, 1.0)).all()))


def win_rate(outcomes: list[str]) -> Measure:
    """The tuned model's share of pairwise outcomes ("tuned", "tie", "base"), a tie counting half."""
    return mean([{"tuned": 1.0, "tie": 0.5, "base": 0.0}[o] for o in outcomes])


def perplexity(nll_and_tokens: list[tuple[float, int]]) -> Measure:
    """exp(total negative log-likelihood / total tokens): llama-perplexity's figure, over the reference answers."""
    return Measure(np.asarray(nll_and_tokens, dtype=np.float64).reshape(-1, 2),
                   lambda s: float(np.exp(s[0] / s[1])) if s[1] else float("nan"))


def _resampled(n: int, resamples: int = RESAMPLES) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, n, size=(resamples, n))


def wilson(successes: float, n: float, z: float = 1.959964) -> list[float]:
    if not n:
        return [float("nan"), float("nan")]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def interval(m: Measure) -> list[float]:
    """The 95% interval of ``m.value``: Wilson for a share of 0/1 outcomes, percentile bootstrap otherwise."""
    if m.binary:
        s = m.stats.sum(0)
        return wilson(s[0], s[1])
    if len(m.stats) < 2:
        return [m.value, m.value]
    values = [m.reduce(row) for row in m.stats[_resampled(len(m.stats))].sum(1)]
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def difference(tuned: Measure, base: Measure) -> list[float]:
    """The 95% interval of tuned - base, paired: both recomputed on the same resampled examples."""
    if len(tuned.stats) != len(base.stats) or len(tuned.stats) < 2:
        d = tuned.value - base.value
        return [d, d]
    idx = _resampled(len(tuned.stats))
    d = [tuned.reduce(t) - base.reduce(b) for t, b in zip(tuned.stats[idx].sum(1), base.stats[idx].sum(1))]
    return [float(np.nanpercentile(d, 2.5)), float(np.nanpercentile(d, 97.5))]


def text_measures(answers: list[str], references: list[str], structured: bool) -> dict[str, Measure]:
    """Every text metric of the answers against the references (JSON metrics when ``structured``)."""
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF

    rouge = RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    out = {"exact_match": mean([_norm(a) == _norm(r) for a, r in zip(answers, references)]),
           "token_f1": mean([token_f1(a, r) for a, r in zip(answers, references)]),
           "rouge_l": mean([rouge.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)])}
    for name, metric in (("chrf", CHRF()), ("bleu", BLEU(effective_order=True))):
        # sacrebleu's statistics per sentence, summed by the bootstrap; the corpus score is sacrebleu's.
        stats = np.asarray(metric._extract_corpus_statistics(answers, [references]), dtype=np.float64)
        out[name] = Measure(stats, lambda s, metric=metric: metric._compute_score_from_stats(list(s)).score)
    if structured:
        rows = [json_scores(a, r) for a, r in zip(answers, references)]
        out.update({k: mean([row[k] for row in rows]) for k in STRUCTURED})
    return out


class _Tokenizer:
    """ROUGE's tokens: lower-cased words of any script (rouge-score's default keeps only [a-z0-9], so "Müller"
    became "m ller" and Greek or Cyrillic text nothing at all), one token a character in non-spaced scripts."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKENS.findall(text.lower())


def json_scores(prediction: str, reference: str) -> dict[str, float]:
    ref, got = json_object(reference), json_object(prediction)
    if got is None:
        return {"valid_json": 0.0, "exact_keys": 0.0, "field_accuracy": 0.0}
    # Strict on purpose: a fixed shape is what downstream code relies on ("Nurse" is not "nurse").
    return {"valid_json": 1.0, "exact_keys": float(set(got) == set(ref)),
            "field_accuracy": sum(1 for k in ref if k in got and got[k] == ref[k]) / max(len(ref), 1)}


def token_f1(prediction: str, reference: str) -> float:
    p, r = _norm(prediction).split(), _norm(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
