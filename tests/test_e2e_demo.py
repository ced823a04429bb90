"""End to end on the embedded default model (SmolLM2-135M-Instruct): the real demo, shortened.

Runs `appliance demo` in a fresh workspace: import the Q4_1 GGUF, train QLoRA on 2 CPU cores, merge, export
f16/q8_0/q4_k_m with the self-checks, and score base vs tuned on held-out records. The tuned model must beat
the base on the task's metric; the base model does not know the house format (it invents keys), so it scores
near zero, and a few dozen steps teach it.
"""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


def _on_disk(root, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                tail = b""
                while block := f.read(1 << 24):
                    if needle in tail + block:
                        hits.append(str(p))
                        break
                    tail = block[-len(needle):]
    return hits


def test_demo_on_the_embedded_model(home, tmp_path):
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("demo passphrase for the e2e test\n")
    proc = run_cli("demo", "--json", "--steps", "30", "--eval-samples", "16", home=home, timeout=1800,
                   env={"APPLIANCE_PASSPHRASE_FILE": str(passphrase)})
    result = json.loads(proc.stdout)
    assert result["tuned_beats_base"] is True
    base, tuned = result["eval"]["base"], result["eval"]["tuned"]
    assert tuned["field_accuracy"] >= base["field_accuracy"] + 0.3, (base, tuned)
    assert tuned["valid_json"] >= 0.9
    # Issue 15 on the demo run: the test split, every metric with its interval, the forgetting check, the page.
    ev = result["eval"]
    assert ev["split"] == "test" and {"rouge_l", "chrf", "bleu", "perplexity"} <= set(tuned)
    assert tuned["perplexity"] < base["perplexity"] and tuned["chrf"] > base["chrf"]
    for name in ("base", "tuned"):
        for metric, (lo, hi) in ev["intervals"][name].items():
            assert lo <= ev[name][metric] <= hi, (name, metric)
    assert ev["forgetting"]["items"] == 240 and 0 < ev["forgetting"]["base"] < 1
    assert (home / "runs" / result["run"] / "eval.html").is_file()
    assert set(result["export"]["quality"]["by_quant"]) == {"f16", "q8_0", "q4_k_m"}
    assert result["merge"]["max_abs_logit_diff"] < 1e-3
    parity = result["export"]["parity"]
    assert parity["top1_agreement"] >= 0.99 and parity["eot_token"] == "<|im_end|>"
    assert set(result["export"]["files"]) == {"f16", "q8_0", "q4_k_m"}
    answer = json.loads(result["answer"]["text"])  # the tuned model answers in the house format
    assert list(answer) == ["first_name", "last_name", "age", "city", "occupation"]
    assert result["answer"]["stopped"] == "eog"  # and stops at <|im_end|>, as it was trained to

    # The demo's data went through the vault: its text is nowhere on disk in the clear, not in the dataset
    # folder, the run's checkpoints, events, logs, merged model or GGUFs.
    from appliance.demo_data import splits

    first = splits()["train"][0]["messages"][0]["content"].split("\n", 1)[1].encode()
    assert (home / "datasets" / "demo-records" / "train.c2sp").is_file()
    assert _on_disk(home, first) == []
