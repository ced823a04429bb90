"""What the metrics are called and how their values read: shared by the CLI table, the TUI and the HTML report,
with nothing heavy imported (the TUI loads this at start)."""

from __future__ import annotations

LOWER_BETTER = {"perplexity"}
SCORES = {"chrf", "bleu"}  # 0 to 100, as sacrebleu reports them
PLAIN = {"perplexity", "preference_margin"}  # plain numbers; everything else is a share (0 to 1)
LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L", "chrf": "chrF",
          "bleu": "BLEU", "perplexity": "perplexity", "valid_json": "valid JSON", "exact_keys": "exact keys",
          "field_accuracy": "field accuracy", "preference_accuracy": "preference accuracy",
          "preference_margin": "preference margin"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


def value(metric: str, x: float | None) -> str:
    if x is None:
        return "-"
    if metric in SCORES:
        return f"{x:.1f}"
    if metric in PLAIN:
        return f"{x:.2f}"
    return f"{x:.1%}"


def span(metric: str, pair: list[float] | None) -> str:
    """A 95% interval, as [low, high] in the metric's own unit."""
    if not pair:
        return ""
    lo, hi = pair
    if metric in SCORES or metric in PLAIN:
        return f"[{value(metric, lo)}, {value(metric, hi)}]"
    return f"[{lo * 100:.1f}, {hi * 100:.1f}]%"


def delta(metric: str, d: float) -> str:
    """A difference: points for shares, the metric's unit otherwise."""
    return f"{d:+.2f}" if metric in PLAIN else f"{d:+.1f}" if metric in SCORES else f"{d * 100:+.1f} pts"


def better(metric: str, tuned: float, base: float) -> bool:
    return tuned < base if metric in LOWER_BETTER else tuned > base


def harness_rows(result: dict) -> list[tuple[str, str, float, float | None, float | None]]:
    """(task, metric, base, tuned, tuned's stderr) for every metric of an lm-evaluation-harness result: what the
    CLI table, the page and the Eval screen show."""
    out = []
    for task, metrics in result["base"].items():
        tuned = result["tuned"].get(task, {})
        for metric, b in metrics.items():
            if not metric.endswith("_stderr"):
                out.append((task, metric, b, tuned.get(metric), tuned.get(metric + "_stderr")))
    return out
