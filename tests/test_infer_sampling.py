"""Sampling controls of appliance.infer (temperature, top-p, top-k, min-p, repeat penalty, seed), stopping an
answer from outside, and Chat's settings between turns, on the exported tiny random model (its answers are
gibberish: only their equality matters here)."""

from __future__ import annotations

import pytest

from appliance import infer
from appliance.trust import audit
from appliance.errors import InvalidInput
from tests.conftest import cli_json, run_cli

# What llama.cpp computes: scripts/test.sh runs these once more on its baseline x64 kernels (issue 33).
pytestmark = pytest.mark.llama

PROMPT = [{"role": "user", "content": "Convert this record to JSON.\nAda Weber, 41, baker in Graz."}]


@pytest.fixture(scope="module")
def llm(exported_workspace):
    ws, run_id = exported_workspace
    with infer.load(ws / "runs" / run_id / "gguf" / "model-q8_0.gguf", n_ctx=512) as model:
        yield model


@pytest.fixture(scope="module")
def prompt(llm) -> list[int]:
    return infer.tokenize(llm, infer.render(llm, PROMPT, True))


def answer(llm, prompt, **kw) -> dict:
    kw.setdefault("max_tokens", 24)
    return infer.generate(llm, prompt, **kw)


def test_temperature_zero_is_deterministic_whatever_the_seed(llm, prompt):
    a, b, c = answer(llm, prompt), answer(llm, prompt), answer(llm, prompt, seed=1234)
    assert a["text"] == b["text"] == c["text"] and a["completion_tokens"] > 0


def test_a_fixed_seed_repeats_a_sampled_answer_and_other_seeds_differ(llm, prompt):
    hot = {"temperature": 3.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    first, again = answer(llm, prompt, seed=7, **hot), answer(llm, prompt, seed=7, **hot)
    assert first["text"] == again["text"]
    others = {answer(llm, prompt, seed=s, **hot)["text"] for s in (1, 2, 3, 4)}
    assert len(others | {first["text"]}) > 1  # the seed does reach the sampler


def test_top_k_one_is_greedy_at_any_temperature(llm, prompt):
    greedy = answer(llm, prompt)["text"]
    assert answer(llm, prompt, temperature=2.0, top_k=1, top_p=1.0, min_p=0.0, seed=99)["text"] == greedy


def test_should_stop_ends_the_answer_after_the_first_token(llm, prompt):
    pieces: list[str] = []
    result = answer(llm, prompt, max_tokens=200, on_text=pieces.append, should_stop=lambda: len(pieces) >= 1)
    assert result["stopped"] == "user" and result["completion_tokens"] == 1
    assert result["text"] == "".join(pieces)
    assert answer(llm, prompt, max_tokens=3)["stopped"] in ("max_tokens", "eog")


def test_repeat_penalty_changes_the_greedy_answer(llm, prompt):
    # The random model repeats itself when greedy; a strong penalty makes it pick other tokens.
    plain, penalised = answer(llm, prompt, max_tokens=48), answer(llm, prompt, max_tokens=48, repeat_penalty=5.0)
    assert plain["text"] != penalised["text"]


@pytest.mark.parametrize("knob, value, field", [
    ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top-p"), ("top_p", 1.5, "top-p"), ("top_k", -1, "top-k"),
    ("top_k", 2.5, "top-k"), ("min_p", 1.2, "min-p"), ("repeat_penalty", 0, "repeat penalty"),
    ("seed", -1, "seed"), ("seed", 2**32, "seed"), ("max_tokens", 0, "max tokens"),
    ("temperature", float("nan"), "temperature")])
def test_a_setting_out_of_range_is_one_sentence_naming_it(knob, value, field):
    with pytest.raises(InvalidInput) as e:
        infer.check_sampling(**{knob: value})
    assert str(e.value).startswith(f"{field} must be ") and str(e.value).count(".") <= 2


def test_chat_settings_change_between_turns_reset_and_audit(exported_home):
    home, run_id = exported_home
    with infer.Chat(run_id, system="Answer in JSON.", max_tokens=8, temperature=0.0) as chat:
        first = chat.say("hello")
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
        chat.reset()
        assert chat.messages == [{"role": "system", "content": "Answer in JSON."}]
        assert chat.say("hello")["text"] == first["text"]  # the same conversation again, greedy
        chat.temperature, chat.top_k, chat.seed = 2.0, 1, 5  # top-k 1 is greedy whatever the temperature
        chat.reset()
        assert chat.say("hello")["text"] == first["text"]
        chat.system = None
        assert chat.messages[0]["role"] == "user" and chat.system is None
        chat.system = "Be brief."
        assert chat.messages[0] == {"role": "system", "content": "Be brief."}
        stopped = chat.say("and again", should_stop=lambda: True)
        assert stopped["stopped"] == "user" and chat.messages[-1] == {"role": "assistant", "content": stopped["text"]}
        chat.max_tokens = 4096  # cannot fit the context with the conversation: refused, the conversation unchanged
        before = list(chat.messages)
        with pytest.raises(InvalidInput, match="start a new chat"):
            chat.say("one more")
        assert chat.messages == before
    entry = audit.entries(event="chat")[-1]
    assert entry["subjects"]["model"].endswith("model-q8_0.gguf") and entry["details"] == {"turns": 4}


def test_cli_flags_reach_the_sampler(exported_home):
    home, run_id = exported_home
    base = ("ask", run_id, "--prompt", "hello", "--max-tokens", "6")
    greedy = cli_json(*base, home=home)
    assert cli_json(*base, "--temperature", "2", "--top-k", "1", "--seed", "3", home=home)["text"] == greedy["text"]
    bad = run_cli(*base, "--top-p", "0", home=home, check=False)
    assert bad.returncode != 0 and "top-p must be" in bad.stderr and "Traceback" not in bad.stderr
    chat = run_cli("chat", run_id, "--max-tokens", "4", "--temperature", "0.9", "--top-p", "0.5", "--seed", "1",
                   "--repeat-penalty", "1.1", home=home, input="hello\n\n")
    assert chat.stdout.count("model> ") == 1
    assert [e["event"] for e in audit.entries()][-3:] == ["ask", "ask", "chat"]  # the refused ask records nothing
