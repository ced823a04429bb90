"""Issue 15: the local judge (both orders, inconsistency is a tie) and the blind A/B review by people, on the tiny
model through the real CLI."""

from __future__ import annotations

import json

import pytest

from conftest import cli_json, run_cli


def test_judge_asks_both_orders_counts_inconsistency_as_a_tie_and_keeps_its_prompt(exported_home):
    from appliance.trust import audit

    home, run_id = exported_home
    report = cli_json("eval", run_id, "--samples", "4", "--judge", "tiny", home=home)
    judge = report["judge"]
    assert judge["items"] == 4 and sum(judge["tally"].values()) == 4
    for v in judge["verdicts"]:
        assert v["final"] == (v["base_first"] if v["base_first"] == v["tuned_first"] else "tie")
    consistent = sum(v["base_first"] == v["tuned_first"] for v in judge["verdicts"]) / 4
    assert judge["consistency"] == pytest.approx(consistent)
    assert judge["tally"]["tuned_wins"] == sum(v["final"] == "tuned" for v in judge["verdicts"])
    lo, hi = judge["win_rate_interval"]
    assert 0 <= lo <= judge["win_rate"] <= hi <= 1
    assert "[[A]]" in judge["prompt"]["system"] and "{reference}" in judge["prompt"]["user"]
    assert judge["advisory"].startswith("advisory") and "own answers" in judge["note"]  # tiny judges tiny's answers
    saved = json.loads((home / "runs" / run_id / "eval.json").read_text())
    assert saved["judge"]["tally"] == judge["tally"]
    entry = [e for e in audit.entries(event="eval") if e["event"] == "eval"][-1]
    assert entry["subjects"] == {"run": run_id} and entry["details"]["judge_tally"] == judge["tally"]
    shown = run_cli("eval", run_id, "--samples", "2", "--judge", "tiny", home=home).stdout
    assert "judge tiny" in shown and "judge consistency" in shown and "advisory" in shown
    missing = run_cli("eval", run_id, "--judge", "no-such-model", home=home, check=False)
    assert missing.returncode == 2 and "neither a .gguf file" in missing.stderr and "Traceback" not in missing.stderr


def test_a_judge_that_favours_a_position_makes_no_winner(exported_home):
    """The both-orders rule, tested by what it must do rather than by replaying it: when base and tuned gave the
    same answer, the judge sees the same prompt in both orders, so whatever it answers (a judge that always says
    [[A]] included) no side may win: every item is a tie. Swapping the second order's mapping would fail this."""
    from appliance import infer
    from appliance.evaluate.judge import judge

    home, run_id = exported_home
    prompts = [[{"role": "user", "content": q}] for q in ("Name a colour.", "Count to three.", "Say hi.")]
    answers = ["Blue.", "One, two, three.", "Hi!"]
    result = judge(infer.resolve("tiny"), "tiny", prompts, answers, answers, list(answers))
    assert result["tally"] == {"tuned_wins": 0, "ties": 3, "base_wins": 0}, result["verdicts"]
    assert all(v["final"] == "tie" for v in result["verdicts"])
    # Each order's verdict was the judge's own: a position-biased judge is seen as inconsistent, not as a winner.
    assert all(v["base_first"] == "tie" or v["base_first"] != v["tuned_first"] for v in result["verdicts"])


def test_blind_review_hides_which_model_tallies_and_audits_who(exported_home):
    from appliance.evaluate.review import Review, load_answers
    from appliance.trust import audit

    home, run_id = exported_home
    cli_json("eval", run_id, "--samples", "6", home=home)
    answers = load_answers(run_id)
    assert len(answers) == 6 and (home / "runs" / run_id / "eval-answers.jsonl").is_file()  # a plain-folder dataset

    # The sides are drawn at random: over many sessions tuned is A about half the time. (Strict: the tuned tiny
    # model answers differently from its base, so there are items to show; none would fail here, not pass.)
    tuned_first = [Review(run_id, "x", seed=seed).items[0][1] for seed in range(40)]
    assert 0.2 < sum(tuned_first) / len(tuned_first) < 0.8

    # Always choosing A: the tally follows which model each A was.
    r = Review(run_id, "dana", seed=3)
    assert r.items, "no differing answers to review: the test would prove nothing"
    expected = {"tuned": 0, "base": 0}
    while (item := r.current()) is not None:
        assert set(item) == {"number", "total", "prompt", "reference", "a", "b"}  # nothing says which is which
        expected["tuned" if r.items[len(r.votes)][1] else "base"] += 1
        r.vote("a")
    tally = r.save()
    assert tally["tuned_wins"] == expected["tuned"] and tally["base_wins"] == expected["base"]
    assert tally["ties"] == r.identical and tally["items"] == 6
    entry = audit.entries(event="eval.review")[-1]
    assert entry["details"]["reviewer"] == "dana" and entry["details"]["tuned_wins"] == expected["tuned"]

    # The CLI: answers from stdin, q stops early; the tally joins eval.json beside the first.
    shown = len(r.items)
    out = run_cli("eval", run_id, "--review", "--reviewer", "lee", "--json", home=home, input="t\ns\nq\n")
    cli_tally = json.loads(out.stdout)
    assert cli_tally["reviewer"] == "lee" and cli_tally["skipped"] == min(1, max(shown - 1, 0))
    reviews = json.loads((home / "runs" / run_id / "eval.json").read_text())["reviews"]
    assert [x["reviewer"] for x in reviews] == ["dana", "lee"]
    bad = run_cli("eval", run_id, "--review", "--limit", "0", home=home, check=False)
    assert bad.returncode == 2 and "--limit 0" in bad.stderr
