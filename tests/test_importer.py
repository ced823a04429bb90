"""`appliance data import`: formats, validation with locations, cleaning, split, messy files, and the CLI around it."""

import json

import pytest

from appliance.errors import InvalidInput
from appliance.importer import import_dataset
from appliance.trust import keyring, manifest, store
from conftest import run_cli

CANARY = "CANARY-b81d-import-text-never-on-disk"
LONG = "please write a careful and complete answer about the following topic"


@pytest.fixture
def vault(home):
    return keyring.init("correct horse")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alpaca(i, tag=""):
    return {"instruction": f"{LONG} number {i} {tag}", "output": f"answer {i} {CANARY}"}


@pytest.mark.parametrize("fmt, row", [
    ("chat", {"messages": [{"role": "user", "content": f"{LONG} {{i}}"}, {"role": "assistant", "content": "ok {i}"}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": f"{LONG} {{i}}"}, {"from": "gpt", "value": "ok {i}"}]}),
    ("alpaca", {"instruction": f"{LONG} {{i}}", "input": "context", "output": "ok {i}"}),
    ("completion", {"prompt": f"{LONG} {{i}}", "completion": "ok {i}"}),
    ("dpo", {"prompt": f"{LONG} {{i}}", "chosen": "good {i}", "rejected": "bad {i}"}),
])
def test_formats_are_detected_and_normalized(vault, tmp_path, fmt, row):
    rows = [json.loads(json.dumps(row).replace("{i}", str(i))) for i in range(20)]
    report = import_dataset(vault, _jsonl(tmp_path / "d.jsonl", rows), "d")
    assert report["format"] == fmt and report["imported"] == {"train": 16, "validation": 2, "test": 2}
    first = next(store.read(vault, "d", "train"))
    if fmt == "dpo":
        assert first["prompt"][0]["role"] == "user" and first["chosen"].startswith("good")
    else:
        assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
        assert first["messages"][1]["content"].startswith("ok")


def test_csv_with_named_columns_and_a_json_array(vault, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\n" + "".join(f'"{LONG}, {i}",,"ok {i}"\n' for i in range(10)))
    assert import_dataset(vault, csv, "c")["format"] == "alpaca"
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([_alpaca(i) for i in range(10)], indent=1))
    r = import_dataset(vault, arr, "j")
    assert r["kind"] == "json" and sum(r["imported"].values()) == 10


def test_every_rejection_is_counted_with_file_line_and_field(vault, tmp_path):
    rows = [_alpaca(i) for i in range(30)]
    rows += [
        rows[0],                                                   # line 31: exact duplicate
        {"instruction": rows[1]["instruction"], "output": "a different answer"},  # line 32: conflicts with line 2
        {"instruction": "hi", "output": "hello"},                  # line 33: too short
        {"instruction": "   ", "output": f"{LONG} x"},             # line 34: empty turn
        {"output": f"{LONG} y"},                                   # line 35: missing field
        {"messages": [{"role": "wizard", "content": "x"}]},        # line 36: malformed for alpaca
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"instruction": "broken json\n')                  # line 37: not JSON
    r = import_dataset(vault, path, "d")
    assert r["records_read"] == 37
    rej = r["rejected"]
    assert (rej["exact_duplicate"], rej["conflicting_answers"], rej["too_short"], rej["empty_turn"]) == (1, 2, 1, 1)
    assert rej["invalid"] == 3
    assert sum(r["imported"].values()) == 29  # 30 good rows, one of them in a conflict
    ex = r["examples"]
    assert ex["exact_duplicate"][0]["where"] == f"{path}:31"
    assert {e["where"] for e in ex["conflicting_answers"]} == {f"{path}:2", f"{path}:32"}
    assert ex["empty_turn"][0] == {**ex["empty_turn"][0], "where": f"{path}:34", "field": "instruction"}
    assert any(e["where"] == f"{path}:35" and e["field"] == "instruction" for e in ex["invalid"])
    assert any(e["where"] == f"{path}:37" and "not valid JSON" in e["detail"] for e in ex["invalid"])
    # The report is stored, encrypted, with the dataset.
    stored = next(store.read(vault, "d", "report"))
    assert stored["rejected"] == rej


def test_unknown_roles_in_chat(vault, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{LONG} {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": LONG}, {"role": "robot", "content": "beep"}]})
    r = import_dataset(vault, _jsonl(tmp_path / "d.jsonl", rows), "d")
    assert r["rejected"]["unknown_role"] == 1
    assert r["examples"]["unknown_role"][0]["field"] == "messages[1].role"


def test_near_duplicates_by_minhash_threshold(vault, tmp_path):
    text = " ".join(f"word{j}" for j in range(200))
    rows = [{"instruction": text, "output": "first answer"},
            {"instruction": text + " extra", "output": "first answer"},  # Jaccard of 3-grams ~0.99
            {"instruction": " ".join(f"other{j}" for j in range(200)), "output": "second answer"}]
    r = import_dataset(vault, _jsonl(tmp_path / "d.jsonl", rows), "d", val_ratio=0)
    assert r["rejected"]["near_duplicate"] == 1 and r["imported"]["train"] == 2
    assert r["examples"]["near_duplicate"][0]["detail"].endswith("d.jsonl:1")
    r = import_dataset(vault, tmp_path / "d.jsonl", "d2", val_ratio=0, near_dup=1.0)
    assert r["rejected"]["near_duplicate"] == 0 and r["imported"]["train"] == 3


def test_split_is_deterministic_and_seeded(vault, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_alpaca(i) for i in range(100)])
    # These records differ by a number only (near-copies at 0.8): the leakage check is off to see the split.
    import_dataset(vault, path, "a", seed=1, leakage=1.0)
    import_dataset(vault, path, "b", seed=1, leakage=1.0)
    import_dataset(vault, path, "c", seed=2, leakage=1.0)
    import_dataset(vault, path, "old", seed=1, val_ratio=0.1, leakage=1.0)  # the two-way split of before
    val = {k: [r["messages"][0]["content"] for r in store.read(vault, k, "validation")] for k in ("a", "b", "c", "old")}
    test = {k: [r["messages"][0]["content"] for r in store.read(vault, k, "test")] for k in "ab"}
    assert len(val["a"]) == 10 and val["a"] == val["b"] and val["a"] != val["c"]
    assert len(test["a"]) == 10 and test["a"] == test["b"] and not set(test["a"]) & set(val["a"])
    assert val["old"] == val["a"]  # a dataset re-imported with a test split keeps its validation records
    assert manifest.read(store.dataset_dir("old"))["details"]["records"] == {"train": 90, "validation": 10, "report": 1}


def test_split_shares_parse_and_bad_ones_say_how(vault, tmp_path):
    from appliance.importer import parse_split

    assert parse_split("80/10/10") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_split("0.7,0.2,0.1") == pytest.approx((0.7, 0.2, 0.1))
    for bad, says in (("80/20", "three shares"), ("80/10/20", "adds up to 110"), ("a/b/c", "three shares")):
        with pytest.raises(InvalidInput, match=says):
            parse_split(bad)
    path = _jsonl(tmp_path / "d.jsonl", [_alpaca(i) for i in range(20)])
    r = import_dataset(vault, path, "d", split=(0.5, 0.25, 0.25), leakage=1.0)
    assert r["imported"] == {"train": 10, "validation": 5, "test": 5} and r["settings"]["split"] == [0.5, 0.25, 0.25]
    with pytest.raises(InvalidInput, match="only --split"):
        import_dataset(vault, path, "e", split=(0.8, 0.1, 0.1), val_ratio=0.1)


def test_leakage_moves_held_out_near_copies_to_the_earlier_split_and_names_both_lines(vault, tmp_path):
    import random

    rng = random.Random(3)
    words = [f"w{j}" for j in range(5000)]
    base = [" ".join(rng.choices(words, k=200)) for _ in range(60)]
    rows = [{"instruction": t, "output": f"answer {i}"} for i, t in enumerate(base)]
    # 30 near-copies (Jaccard of word 3-grams 0.8: under the near-duplicate threshold, over the leakage one).
    tail = "".join(f" tail{j}" for j in range(50))
    rows += [{"instruction": t + tail, "output": f"answer {i}"} for i, t in enumerate(base[:30])]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    off = import_dataset(vault, path, "off", split=(0.5, 0.25, 0.25), leakage=1.0)
    on = import_dataset(vault, path, "on", split=(0.5, 0.25, 0.25), leakage=0.5)
    assert off["rejected"]["near_duplicate"] == 0 and off["leakage"]["moved"] == 0
    assert on["leakage"]["moved"] > 0 and sum(on["imported"].values()) == 90
    for pair in on["leakage"]["pairs"]:
        assert pair["where"].startswith(str(path) + ":") and pair["similar_to"].startswith(str(path) + ":")
        assert ("train", "validation", "test").index(pair["to"]) < ("train", "validation", "test").index(pair["split"])
    sides = {}
    for split in ("train", "validation", "test"):
        for r in store.read(vault, "on", split):
            sides.setdefault(r["messages"][0]["content"].split(" tail0")[0], set()).add(split)
    assert len(sides) == 60 and all(len(s) == 1 for s in sides.values())  # each example and its copy on one side
    stored = next(store.read(vault, "on", "report"))
    assert stored["leakage"]["moved"] == on["leakage"]["moved"]


def test_no_dataset_text_on_disk_after_import(vault, home, tmp_path):
    import_dataset(vault, _jsonl(tmp_path / "d.jsonl", [_alpaca(i) for i in range(40)]), "d")
    blob = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert CANARY.encode() not in blob and LONG.encode() not in blob


# -- messy files --------------------------------------------------------------------------------------------

def test_truncated_json_array_names_offset_and_line_and_salvage_keeps_the_complete_records(vault, tmp_path):
    full = json.dumps([_alpaca(i) for i in range(20)], indent=1)
    cut_at = full.index('"instruction"', full.index(str(_alpaca(15)["instruction"])) - 40) + 5
    path = tmp_path / "export.json"
    path.write_text(full[:cut_at])
    with pytest.raises(InvalidInput) as e:
        import_dataset(vault, path, "d")
    msg = str(e.value)
    assert f"{path}:" in msg and "cut off" in msg and "at byte" in msg and "--salvage" in msg
    assert not store.dataset_dir("d").exists()
    r = import_dataset(vault, path, "d", salvage=True)
    assert r["salvaged"]["kept"] == 15 and sum(r["imported"].values()) == 15
    assert r["salvaged"]["cut_at_line"] > 1


def test_truncated_jsonl_last_line(vault, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(_alpaca(i)) + "\n" for i in range(10)) + '{"instruction": "cut')
    with pytest.raises(InvalidInput, match=r"d.jsonl:11: the file is cut off .* at byte"):
        import_dataset(vault, path, "d")
    assert import_dataset(vault, path, "d", salvage=True)["salvaged"]["kept"] == 10


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    (b"\xff\xfe{\x00}\x00", "UTF-16"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "looks binary"),
    (b'{"instruction": "caf\xe9 au lait is good", "output": "yes"}\n', "byte 20 is not UTF-8"),
    (b"hello world\n", "neither JSON Lines"),
])
def test_unreadable_files_get_one_clear_sentence(vault, tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=fragment):
        import_dataset(vault, path, "d")
    assert not store.dataset_dir("d").exists()


def test_bom_is_accepted(vault, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(_alpaca(i)) + "\n" for i in range(5)).encode())
    assert import_dataset(vault, path, "d")["records_read"] == 5


def test_deeply_nested_json_is_a_rejected_record_not_a_crash(vault, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(_alpaca(i)) + "\n" for i in range(5)) + "[" * 100000 + "]" * 100000 + "\n")
    r = import_dataset(vault, path, "d")
    assert r["rejected"]["invalid"] == 1 and "nested too deeply" in r["examples"]["invalid"][0]["detail"]


def test_a_50_mb_single_line_imports(vault, tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i in range(3):
            f.write(json.dumps(_alpaca(i)) + "\n")
        f.write(json.dumps({"instruction": LONG, "output": "z" * (50 * 2**20)}) + "\n")
    r = import_dataset(vault, path, "d", val_ratio=0)
    assert r["imported"]["train"] == 4
    assert max(len(x["messages"][1]["content"]) for x in store.read(vault, "d", "train")) == 50 * 2**20


# -- the CLI ------------------------------------------------------------------------------------------------

def test_cli_import_list_show_export_rm(home, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    env = {"APPLIANCE_PASSPHRASE_FILE": str(pw)}
    src = _jsonl(tmp_path / "d.jsonl", [_alpaca(i) for i in range(20)])
    missing = run_cli("data", "import", str(src), "--name", "d", home=home, env=env, check=False)
    assert missing.returncode == 2 and "vault init" in missing.stderr
    run_cli("vault", "init", home=home, env=env)
    out = run_cli("data", "import", str(src), "--name", "d", home=home, env=env).stdout
    assert "format alpaca" in out and "16 train + 2 validation + 2 test" in out
    bad = run_cli("data", "import", str(src), "--name", "e", "--split", "90/20/10", home=home, env=env, check=False)
    assert bad.returncode == 2 and "adds up to 120" in bad.stderr and "Traceback" not in bad.stderr
    listed = json.loads(run_cli("data", "list", "--json", home=home).stdout)["datasets"]
    assert listed == [{"id": "d", "encrypted": True, "records": {"train": 16, "validation": 2, "test": 2, "report": 1},
                       "format": "appliance-dataset/1", "source": "d.jsonl"}]
    shown = json.loads(run_cli("data", "show", "d", "-n", "2", "--json", home=home, env=env).stdout)
    assert len(shown["records"]) == 2 and CANARY in shown["records"][0]["messages"][1]["content"]
    exported = tmp_path / "plain.jsonl"
    run_cli("data", "export", "d", "--out", str(exported), home=home, env=env)
    assert len(exported.read_text().splitlines()) == 20
    again = run_cli("data", "export", "d", "--out", str(exported), home=home, env=env, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    refused = run_cli("data", "rm", "d", home=home, env=env, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr and store.dataset_dir("d").exists()
    run_cli("data", "rm", "d", "--yes", home=home, env=env)
    assert not store.dataset_dir("d").exists()
    gone = run_cli("data", "show", "d", home=home, env=env, check=False)
    assert gone.returncode == 2 and "no dataset named 'd'" in gone.stderr


# -- near-duplicate estimator (one-permutation MinHash, appliance/importer/minhash.py) ------------------------

def _pair_with_jaccard(rng, shingles: int, jaccard: float) -> tuple[str, str, float]:
    """Two texts of distinct random words whose word 3-gram sets have about the given Jaccard similarity.

    B is A with its last k words replaced: they share m-k of their m = n-2 3-grams each, J = (m-k)/(m+k).
    Returns the texts and their exact J.
    """
    n = shingles + 2
    words = [f"w{rng.getrandbits(40):x}" for _ in range(2 * n)]
    m = n - 2
    k = max(1, round(m * (1 - jaccard) / (1 + jaccard))) if jaccard < 1 else 0
    return " ".join(words[:n]), " ".join(words[:n - k] + words[n:n + k]), (m - k) / (m + k)


@pytest.mark.parametrize("jaccard", [0.95, 0.9, 0.8, 0.5])
@pytest.mark.parametrize("shingles", [200, 40])
def test_minhash_lsh_flags_pairs_as_often_as_minhash_should(jaccard, shingles):
    """With datasketch's banding for threshold 0.9 (b=5 bands of r=25 values), a pair with Jaccard J is flagged
    with probability 1-(1-J^r)^b when the signature's values are independent and each equal with probability
    J: 0.80 at J=0.95, 0.31 at 0.9, 0.02 at 0.8, ~0 at 0.5 (what the classic 128-permutation MinHash gives).
    Our one-permutation signatures must flag as often, within 4.5 standard deviations of the binomial, for
    typical records (~200 shingles) and short ones (40 shingles, mostly densified bins); and unrelated texts
    must never collide."""
    import math
    import random

    from appliance.importer import _Clock, _NearDuplicates

    rng = random.Random(f"{jaccard}-{shingles}")
    trials = 300
    near = _NearDuplicates(0.9, _Clock())
    b, r = near.lsh.b, near.lsh.r
    expected = 0.0
    for t in range(trials):
        a, b_text, exact = _pair_with_jaccard(rng, shingles, jaccard)
        expected += 1 - (1 - exact ** r) ** b
        near.add(2 * t, f"a:{t}", a)
        near.add(2 * t + 1, f"b:{t}", b_text)
    near.flush()
    pairs = sum(1 for i, (_, detail) in near.duplicates.items() if i % 2 and detail.endswith(f"a:{i // 2}"))
    assert len(near.duplicates) == pairs  # no collision between unrelated texts
    p = expected / trials
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(pairs - expected) <= 4.5 * sigma + 2, (pairs, expected)


def test_signatures_estimate_jaccard_without_bias():
    """Each of the 128 values of two signatures is equal with probability J: the fraction equal estimates J."""
    import random

    import numpy as np

    from appliance.importer import minhash

    rng = random.Random(3)
    for jaccard in (0.9, 0.5, 0.2):
        estimates = []
        for _ in range(100):
            a, b, exact = _pair_with_jaccard(rng, 150, jaccard)
            sa, sb = minhash.signatures([a, b])
            estimates.append(float(np.mean(sa == sb)) - exact)
        assert abs(np.mean(estimates)) < 0.02, (jaccard, np.mean(estimates))


def test_signatures_do_not_depend_on_the_batch_or_on_long_words():
    from appliance.importer import minhash

    texts = ["Hello  World\tfoo bar baz", "héllo wörld\u00a0foo bar", "x " * 5000, "z" * 3000, "one", "", "a b"]
    together = minhash.signatures(texts)
    for k, text in enumerate(texts):
        assert (minhash.signatures([text])[0] == together[k]).all()
    assert (minhash.signatures(["hello world foo\n bar baz"])[0] == together[0]).all()  # case, whitespace
    data = " ".join(["word"] * 2000 + ["y" * 5000] + ["tail"] * 3).encode()
    whole = minhash.word_hashes(data)
    segment, minhash.SEGMENT = minhash.SEGMENT, 1000
    try:
        pieces = minhash.word_hashes(data)
    finally:
        minhash.SEGMENT = segment
    assert (whole[0] == pieces[0]).all() and (whole[1] == pieces[1]).all()
