"""A local model as judge: base and tuned answers compared pairwise, asked in both orders (MT-Bench's protocol).

The judge (any GGUF llama.cpp loads: an imported model, a run, a file) reads the question, the reference answer
and two answers labelled A and B, with MT-Bench's reference-guided pairwise instructions (Zheng et al. 2023,
"Judging LLM-as-a-Judge"), and its verdict is the most likely of the three answers the instructions allow,
``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie), scored through llama.cpp: a small local judge cannot be trusted to
follow the format when generating freely, and scoring the three is greedy decoding constrained to them. Each pair
is judged twice, base as A then tuned as A; a judge that changes its mind when the order changes has a position
bias, and that pair counts as a tie. The share of pairs judged alike in both orders is the judge's consistency.

The result is advisory: a judge is a model with its own biases (self-preference, length), which is why the
report keeps the exact instructions it was given and the review by people (``review``) sits beside it.
"""

from __future__ import annotations

from ..events import Emit, Event, ignore
from ..native_crash import step

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate which "
    "assistant's answer is better. Identify and correct any mistakes. Avoid any position biases and ensure that "
    "the order in which the responses were presented does not influence your decision. Do not allow the length "
    "of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as "
    "objective as possible. Output your final verdict by strictly following this format: \"[[A]]\" if assistant "
    "A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
VERDICTS = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "tie"}
ADVISORY = ("advisory: a model's judgement, with its own biases (position, length, its own style); pairs it "
            "judged differently in the two orders count as ties")


def question_text(prompt: list[dict]) -> str:
    """The prompt turns as the judge reads them: the question alone, or a short transcript when there are more."""
    turns = [t for t in prompt if t["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def verdict(llm, question: str, reference: str, a: str, b: str) -> str:
    """"A", "B" or "tie": the judge's most likely allowed answer."""
    from .scoring import answer_logprob

    prompt = [{"role": "user", "content": USER.format(question=question, reference=reference, a=a, b=b)}]
    scores = {v: answer_logprob(llm, prompt, text, SYSTEM)[0] for text, v in VERDICTS.items()}
    return max(scores, key=scores.get)


def judge(path, label: str, prompts: list[list[dict]], references: list[str], base: list[str], tuned: list[str],
          emit: Emit = ignore, stage: str = "eval") -> dict:
    """Every test item judged in both orders; the tally (tuned wins / ties / base wins) with intervals."""
    from .. import infer
    from . import metrics
    from .scoring import N_CTX

    emit(Event("stage", stage, f"judging {len(prompts)} pairs of answers with {label}, in both orders"))
    items = []
    with infer.load(path, n_ctx=N_CTX, logits_all=True) as llm, step(f"judging answers with {label}"):
        for i, (prompt, ref, b, t) in enumerate(zip(prompts, references, base, tuned)):
            q = question_text(prompt)
            first = {"A": "base", "B": "tuned", "tie": "tie"}[verdict(llm, q, ref, b, t)]
            second = {"A": "tuned", "B": "base", "tie": "tie"}[verdict(llm, q, ref, t, b)]
            items.append({"index": i, "base_first": first, "tuned_first": second,
                          "final": first if first == second else "tie"})
            emit(Event("progress", stage, "", {"model": "judge", "done": i + 1, "total": len(prompts)}))
    finals = [it["final"] for it in items]
    n = len(items)
    score = metrics.win_rate(finals)
    shares = {k: metrics.mean([f == k for f in finals]) for k in ("tuned", "tie", "base")}
    consistent = metrics.mean([it["base_first"] == it["tuned_first"] for it in items])
    return {"model": label, "items": n, "advisory": ADVISORY,
            "tally": {"tuned_wins": finals.count("tuned"), "ties": finals.count("tie"),
                      "base_wins": finals.count("base")},
            "shares": {k: v.value for k, v in shares.items()},
            "share_intervals": {k: metrics.interval(v) for k, v in shares.items()},
            # wins + half the ties: above 0.5 the judge prefers the tuned model
            "win_rate": score.value, "win_rate_interval": metrics.interval(score),
            "consistency": consistent.value, "consistency_interval": metrics.interval(consistent),
            "verdicts": items, "prompt": {"system": SYSTEM, "user": USER,
                                          "verdict": "the most likely of [[A]], [[B]], [[C]]"}}
