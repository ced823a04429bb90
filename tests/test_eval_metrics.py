"""Issue 15's metrics: ROUGE-L that keeps every script, sacrebleu's chrF and BLEU, perplexity from llama.cpp's
log-probabilities, and bootstrap intervals that are honest about small test sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import cli_json, run_cli

from appliance.evaluate import metrics, names

# What llama.cpp computes: scripts/test.sh runs these once more on its baseline x64 kernels (issue 33).
pytestmark = pytest.mark.llama


def test_rouge_l_keeps_non_ascii_text_that_rouge_scores_default_tokenizer_drops():
    from rouge_score.rouge_scorer import RougeScorer

    ref, ans = "Jürgen Müller wohnt in Köln", "Müller wohnt in Köln"
    default = RougeScorer(["rougeL"]).score(ref, ans)["rougeL"].fmeasure
    ours = metrics.text_measures([ans], [ref], False)["rouge_l"].value
    assert ours == pytest.approx(2 * 1 * 0.8 / 1.8)  # 4 of 5 words, all of them in order
    assert ours != pytest.approx(default)  # the default splits "Müller" into "m ller"
    greek = metrics.text_measures(["καλημέρα κόσμε"], ["καλημέρα κόσμε"], False)["rouge_l"].value
    assert greek == 1.0  # the default tokenizer keeps nothing of Greek: 0
    assert metrics._Tokenizer().tokenize("東京に住む Ana") == ["東", "京", "に", "住", "む", "ana"]


def test_chrf_and_bleu_are_sacrebleus_corpus_scores():
    from sacrebleu.metrics import BLEU, CHRF

    answers = ["the cat sat on the mat today", "a quick brown fox jumps", "hello there my friend"]
    refs = ["the cat sat on a mat today", "the quick brown fox jumps", "hello my good friend"]
    m = metrics.text_measures(answers, refs, False)
    assert m["chrf"].value == pytest.approx(CHRF().corpus_score(answers, [refs]).score)
    assert m["bleu"].value == pytest.approx(BLEU(effective_order=True).corpus_score(answers, [refs]).score)
    perfect = metrics.text_measures(refs, refs, False)
    assert perfect["bleu"].value == pytest.approx(100) and perfect["chrf"].value == pytest.approx(100)


def test_intervals_hold_the_value_shrink_with_more_examples_and_differences_are_paired():
    rng = np.random.default_rng(1)
    small = metrics.mean(rng.random(12) < 0.5)
    large = metrics.mean(rng.random(1200) < 0.5)
    for m in (small, large):
        lo, hi = metrics.interval(m)
        assert lo <= m.value <= hi
    assert np.diff(metrics.interval(small))[0] > 3 * np.diff(metrics.interval(large))[0]
    # The same 40 examples, tuned right on 8 more of them: unpaired intervals overlap, the paired difference
    # excludes 0.
    base = rng.random(40) < 0.5
    tuned = base.copy()
    tuned[np.flatnonzero(~base)[:8]] = True
    lo, hi = metrics.difference(metrics.mean(tuned), metrics.mean(base))
    assert 0 < lo <= 8 / 40 <= hi
    assert metrics.interval(metrics.mean(tuned))[0] < metrics.interval(metrics.mean(base))[1]
    assert metrics.difference(metrics.mean(base), metrics.mean(base)) == [0.0, 0.0]


def test_a_share_of_right_answers_gets_wilsons_interval_not_a_degenerate_bootstrap():
    none_right = metrics.interval(metrics.mean([0] * 48))
    assert none_right[0] == 0 and 0.07 < none_right[1] < 0.08  # not [0, 0]: 48 examples cannot say "never"
    lo, hi = metrics.interval(metrics.mean([1] * 30 + [0] * 10))
    assert lo < 0.75 < hi and hi - lo < 0.3
    assert not metrics.mean([0.5, 1.0]).binary  # token F1 and the like: bootstrap


def test_perplexity_is_exp_of_the_mean_token_nll():
    m = metrics.perplexity([(2.0, 2), (6.0, 2)])
    assert m.value == pytest.approx(math.exp(2.0))
    lo, hi = metrics.interval(m)
    assert math.exp(1.0) <= lo <= m.value <= hi <= math.exp(3.0)


def test_values_read_in_their_units():
    assert names.value("exact_match", 0.5) == "50.0%" and names.value("bleu", 41.23) == "41.2"
    assert names.value("perplexity", 3.14159) == "3.14" and names.span("chrf", [40, 50]) == "[40.0, 50.0]"
    assert names.span("token_f1", [0.1, 0.25]) == "[10.0, 25.0]%" and names.delta("token_f1", 0.05) == "+5.0 pts"
    assert names.better("perplexity", 2.0, 3.0) and not names.better("bleu", 2.0, 3.0)


def test_llama_cpp_scoring_covers_each_answer_token_once_and_windows_like_llama_perplexity(exported_home):
    from appliance import infer
    from appliance.evaluate import scoring

    home, run_id = exported_home
    prompt = [{"role": "user", "content": "Convert this record to JSON.\nAda Weber, 41, baker in Graz."}]
    answer = '{"first_name": "Ada", "last_name": "Weber", "age": 41, "occupation": "baker", "city": "Graz"}'
    with infer.load(home / "runs" / run_id / "gguf" / "model-f16.gguf", n_ctx=scoring.N_CTX, logits_all=True) as llm:
        ids, start = scoring.answer_ids(llm, prompt, answer, None)
        total, n = scoring.answer_logprob(llm, prompt, answer, None)
        assert n == len(ids) - start > 10
        llm.reset()
        llm.eval(ids)
        rows = scoring.log_softmax(np.asarray(llm.scores[start - 1: len(ids) - 1]))
        assert total == pytest.approx(rows[np.arange(n), ids[start:]].sum(), rel=1e-5)
        # Windows of 16 tokens, half overlapping: every position from the first answer token on, once, in order.
        positions = [p for p, _ in scoring.distributions(llm, ids, start, n_ctx=16)]
        assert positions == list(range(start, len(ids)))
        windowed = sum(float(row[ids[p]]) for p, row in scoring.distributions(llm, ids, start, n_ctx=16))
        assert windowed != pytest.approx(total)  # less context, other log-probabilities: what llama-perplexity does


def test_forgetting_check_scores_both_caches_the_base_and_warns_only_beyond_the_noise(exported_home, monkeypatch):
    from appliance.convert import base_gguf
    from appliance.evaluate import general

    home, run_id = exported_home
    chosen = general.items(12)
    assert [c["task"] for c in chosen[:6]] == list(dict.fromkeys(c["task"] for c in general.items()))  # round robin
    assert all(c["target"] in c["choices"] for c in general.items()) and len(general.items()) == 240
    base, tuned = base_gguf("tiny"), home / "runs" / run_id / "gguf" / "model-f16.gguf"
    out = general.check(base, tuned, 12)
    assert out["items"] == 12 and 0 <= out["base"] <= 1 and out["difference"][0] <= out["tuned"] - out["base"]
    assert sum(t["items"] for t in out["tasks"].values()) == 12 and 0.3 < out["chance"] < 0.5
    calls = []
    real = general.answers
    monkeypatch.setattr(general, "answers", lambda path, label, *a, **k: calls.append(label) or real(path, label, *a, **k))
    again = general.check(base, tuned, 12)
    assert calls == ["tuned"] and again["base"] == out["base"]  # the base's answers came from the cache

    # The verdict: a drop within the noise is no forgetting; one beyond it warns and says what to do.
    verdicts = {"base": [True] * 40, "tuned": [True] * 38 + [False] * 2}
    monkeypatch.setattr(general, "cached_answers", lambda path, label, *a, **k: verdicts[label])
    monkeypatch.setattr(general, "answers", lambda path, label, *a, **k: verdicts[label])
    assert not general.check(base, tuned, 40)["forgetting"]
    verdicts["tuned"] = [True] * 20 + [False] * 20
    warned = general.check(base, tuned, 40)
    assert warned["forgetting"] and "mix general data" in warned["warning"] and warned["difference"][1] < 0


def test_export_measures_each_quant_and_bundle_auto_picks_the_closest_that_fits(exported_home, tmp_path):
    from appliance.evaluate import quants

    home, run_id = exported_home
    exported = cli_json("export", run_id, "--quant", "f16,q8_0,q4_0", home=home)
    by = exported["quality"]["by_quant"]
    assert set(by) == {"f16", "q8_0", "q4_0"} and exported["quality"]["split"] == "test"
    assert by["f16"]["kl_divergence"] == 0 and by["f16"]["same_top1"] == 1
    assert 0 < by["q8_0"]["kl_divergence"] < by["q4_0"]["kl_divergence"]  # fewer bits, further from f16
    assert by["q4_0"]["bytes"] < by["q8_0"]["bytes"] < by["f16"]["bytes"]
    for v in by.values():
        lo, hi = v["perplexity_interval"]
        assert lo <= v["perplexity"] <= hi
    shown = run_cli("export", run_id, "--quant", "f16,q8_0,q4_0", home=home).stdout
    assert "quality per quantization" in shown and "KL vs f16" in shown

    assert quants.parse_size("2GB") == 2_000_000_000 and quants.parse_size("1.5GiB") == int(1.5 * 2**30)
    between = (by["q8_0"]["bytes"] + by["q4_0"]["bytes"]) // 2
    out = cli_json("bundle", run_id, "--out", str(tmp_path / "b1"), "--quant", "auto", "--max-size", str(between),
                   home=home)
    assert out["quant"] == "q4_0" and "lowest KL divergence" in out["chosen_because"]
    assert cli_json("bundle", run_id, "--out", str(tmp_path / "b2"), "--quant", "auto", home=home)["quant"] == "f16"
    tiny = run_cli("bundle", run_id, "--out", str(tmp_path / "b3"), "--quant", "auto", "--max-size", "1KB",
                   home=home, check=False)
    assert tiny.returncode == 2 and "no exported quantization" in tiny.stderr and not (tmp_path / "b3").exists()
    bad = run_cli("bundle", run_id, "--out", str(tmp_path / "b4"), "--quant", "auto", "--max-size", "lots",
                  home=home, check=False)
    assert bad.returncode == 2 and "is not a size" in bad.stderr
