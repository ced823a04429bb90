"""The audit log: hash chain, signed checkpoints, every kind of tampering named, concurrent and torn appends."""

import json
import subprocess
import sys

import pytest

from appliance.trust import audit, signing
from appliance.errors import CheckFailed
from conftest import PASSPHRASE, cli_json, init_vault, run_cli


@pytest.fixture
def home(home):
    init_vault()
    return home


def _lines():
    return audit.log_path().read_bytes().splitlines(keepends=True)


def _write(lines):
    audit.log_path().write_bytes(b"".join(lines))


def _fill(n=6):
    for i in range(n):
        audit.record("dataset.show", {"dataset": f"d{i}"}, {"split": "train", "records": i})


def test_chain_and_checkpoints_verify(home):
    _fill()
    result = audit.verify()
    assert result["entries"] == 7 and result["signed_through"] == 7 and result["unsigned_tail"] == 0
    assert [e["seq"] for e in audit.entries()] == list(range(1, 9))  # + the audit.verify entry itself
    assert audit.entries()[0]["event"] == "vault.init"
    first = audit.entries()[0]
    assert first["prev"] == audit.GENESIS and first["hash"] == audit.entry_hash(first)
    assert len(audit.entries(event="dataset")) == 6 and len(audit.entries(event="dataset.show")) == 6
    assert audit.entries(since="2999-01-01") == [] and len(audit.entries(since="1h")) == 8


def test_an_edited_entry_is_named(home):
    _fill()
    lines = _lines()
    lines[3] = lines[3].replace(b'"records":2', b'"records":9')
    _write(lines)
    with pytest.raises(CheckFailed, match=r"log.jsonl:4: entry 4 \(dataset.show\) was edited"):
        audit.verify()


def test_an_edited_and_rehashed_entry_breaks_the_chain(home):
    _fill()
    lines = _lines()
    entry = json.loads(lines[3])
    entry["details"]["records"] = 9
    entry["hash"] = audit.entry_hash(entry)
    lines[3] = signing.canonical(entry) + b"\n"
    _write(lines)
    with pytest.raises(CheckFailed, match=r"log.jsonl:4: entry 4 was edited or replaced"):
        audit.verify()


def test_a_deleted_entry_is_named(home):
    _fill()
    lines = _lines()
    del lines[2]
    _write(lines)
    with pytest.raises(CheckFailed, match=r"entry 3 is missing .* entries were deleted"):
        audit.verify()


def test_reordered_entries_are_named(home):
    _fill()
    lines = _lines()
    lines[2], lines[3] = lines[3], lines[2]
    _write(lines)
    with pytest.raises(CheckFailed, match=r"log.jsonl:3: entry 4 stands where entry 3 belongs; entries were reordered"):
        audit.verify()


def test_truncation_is_caught_by_the_signed_checkpoints(home):
    _fill()
    _write(_lines()[:-2])  # whole entries gone from the end: the chain itself is still consistent
    with pytest.raises(CheckFailed, match=r"was truncated: it ends at entry 5 but entry 6 was signed"):
        audit.verify()


def test_a_rewritten_chain_is_caught_by_the_signed_checkpoints(home):
    _fill()
    lines = [json.loads(raw) for raw in _lines()]
    prev = lines[2]["hash"]
    for entry in lines[3:]:  # rewrite from entry 4 on, re-chaining every hash: only a signature can tell
        if entry["seq"] == 4:
            entry["details"]["records"] = 99
        entry["prev"] = prev
        entry["hash"] = prev = audit.entry_hash(entry)
    _write([signing.canonical(e) + b"\n" for e in lines])
    with pytest.raises(CheckFailed, match=r"entries 4..4 were rewritten"):
        audit.verify()


def test_a_bad_checkpoint_signature_and_a_foreign_key_are_named(home, tmp_path):
    _fill(2)
    cps = audit.checkpoints_path().read_bytes().splitlines(keepends=True)
    cp = json.loads(cps[1])
    cp["time"] = "2000-01-01T00:00:00.000000Z"
    cps[1] = signing.canonical(cp) + b"\n"
    audit.checkpoints_path().write_bytes(b"".join(cps))
    with pytest.raises(CheckFailed, match=r"checkpoints.jsonl:2 \(entry 2\) has a bad signature"):
        audit.verify()
    _, other = signing.new_private()
    with pytest.raises(CheckFailed, match="not by the trusted key"):
        audit.verify(other)


def test_a_torn_append_verifies_up_to_the_last_whole_entry_and_is_repaired(home):
    _fill(3)
    with open(audit.log_path(), "ab") as f:
        f.write(b'{"details":{},"event":"dataset.sh')  # a crash in the middle of an append
    result = audit.verify()
    assert result["entries"] == 4 and result["torn_tail_bytes"] == 33
    audit.record("dataset.show", {"dataset": "after"})
    repaired = audit.entries(event="audit.repaired")
    assert len(repaired) == 1 and repaired[0]["details"]["discarded_bytes"] == 33
    assert audit.verify()["torn_tail_bytes"] == 0


def test_two_processes_appending_at_once_never_corrupt_the_log(home):
    code = ("import sys; from appliance.trust import audit\n"
            "for i in range(150): audit.record('ask', {'model': sys.argv[1]}, {'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b", "c")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    result = audit.verify()
    assert result["entries"] == 451  # vault.init + 3 x 150
    for name in "abc":
        assert [e["details"]["i"] for e in audit.entries(event="ask") if e["subjects"]["model"] == name] == list(range(150))


def test_kill_9_while_appending_leaves_a_log_that_verifies(home):
    code = ("from appliance.trust import audit\n"
            "while True: audit.record('ask', {'model': 'm'}, {'pad': 'x' * 3000})\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while audit.log_path().stat().st_size < 300_000:
            pass
    finally:
        proc.kill()
        proc.wait()
    result = audit.verify()
    assert result["entries"] > 50


def test_cli_log_verify_and_report(home, tmp_path):
    pw = tmp_path / "wrong"
    pw.write_text("not the passphrase")
    bad = run_cli("data", "show", "x", home=home, env={"APPLIANCE_PASSPHRASE_FILE": str(pw)}, check=False)
    assert bad.returncode == 2
    log = cli_json("audit", "log", home=home)["entries"]
    assert [e["event"] for e in log] == ["vault.init", "vault.unlock_failed"]
    assert cli_json("audit", "log", "--event", "vault.unlock_failed", home=home)["entries"][0]["user"]
    ok = cli_json("audit", "verify", home=home)
    assert ok["ok"] and ok["entries"] == 2 and ok["unsigned_tail"] == 1  # a failed unlock cannot sign
    out = tmp_path / "report.html"
    run_cli("audit", "report", "--format", "html", "--out", str(out), home=home)
    html = out.read_text()
    assert "Failed unlocks" in html and "vault.unlock_failed" in html and "intact" in html
    again = run_cli("audit", "report", "--out", str(out), home=home, check=False)  # never over an existing file
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out} already exists; name a new file for the report."
    assert out.read_text() == html
    md = run_cli("audit", "report", "--since", "1d", home=home).stdout
    assert md.startswith("# Appliance audit report") and "| vault.init | 1 |" in md
    lines = _lines()
    lines[0] = lines[0].replace(b"pbkdf2-sha256", b"scrypt")
    _write(lines)
    failed = run_cli("audit", "verify", home=home, check=False)
    assert failed.returncode == 3 and "log.jsonl:1: entry 1 (vault.init) was edited" in failed.stderr
    assert audit.entries(event="audit.verify")[-1]["details"]["result"] == "failed"


def test_commands_leave_metadata_entries_and_never_dataset_text(home, tmp_path):
    canary = "CANARY-audit-7f3a"
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"say the word {canary} number {i} please now",
                                       "output": f"the word is {canary} and number {i} of many"}) + "\n"
                           for i in range(12)))
    run_cli("data", "import", str(src), "--name", "canaries", "--near-dup", "1.0", home=home)
    run_cli("data", "show", "canaries", "-n", "2", home=home)
    run_cli("data", "export", "canaries", "--out", str(tmp_path / "plain.jsonl"), home=home)
    run_cli("data", "rm", "canaries", "--yes", home=home)
    events = [e["event"] for e in audit.entries()]
    for name in ("dataset.import", "dataset.show", "dataset.export", "dataset.delete"):
        assert name in events
    show = audit.entries(event="dataset.show")[0]
    assert show["subjects"] == {"dataset": "canaries"} and show["details"]["records"] == 2
    assert canary.encode() not in audit.log_path().read_bytes()
    assert audit.verify()["unsigned_tail"] == 0
    assert PASSPHRASE.encode() not in audit.log_path().read_bytes()


def test_changing_any_byte_of_the_log_or_its_checkpoints_is_detected(home):
    _fill(2)
    for path in (audit.log_path(), audit.checkpoints_path()):
        original = path.read_bytes()
        for i in range(len(original)):
            changed = bytearray(original)
            changed[i] ^= 1
            path.write_bytes(bytes(changed))
            with pytest.raises(CheckFailed):
                audit._verify(None)
        path.write_bytes(original)
    assert audit._verify(None)["entries"] == 3
