"""Encrypted datasets: round trip, no plaintext on disk, files bound to their place, all-or-nothing, shredding."""

import json
import shutil

import pytest

from appliance.errors import CheckFailed, InvalidInput, NotFound
from appliance.trust import keyring, store
from conftest import run_cli

CANARY = "CANARY-7f3a9c-plaintext-must-never-touch-disk"


def _records(n, tag=""):
    return [{"messages": [{"role": "user", "content": f"{CANARY} {tag} question {i}"},
                          {"role": "assistant", "content": f"answer {i} " + "x" * 300}]} for i in range(n)]


@pytest.fixture
def vault(home):
    return keyring.init("correct horse")


def _all_bytes(root):
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_round_trip_and_no_plaintext_on_disk(vault, home):
    train, val = _records(200, "t"), _records(20, "v")  # ~70 KiB: several chunks
    m = store.write(vault, "ds", {"train": train, "validation": val}, source="unit test", hardware={})
    assert m["details"]["records"] == {"train": 200, "validation": 20}
    assert list(store.read(vault, "ds", "train")) == train
    assert list(store.read(keyring.unlock("correct horse"), "ds", "validation")) == val
    assert CANARY.encode() not in _all_bytes(home)
    assert b"question" not in _all_bytes(home)


def test_files_are_bound_to_their_dataset_and_split(vault, home):
    store.write(vault, "a", {"train": _records(3), "validation": _records(2)}, hardware={})
    store.write(vault, "b", {"train": _records(3), "validation": _records(2)}, hardware={})
    a, b = store.dataset_dir("a"), store.dataset_dir("b")
    shutil.copy2(a / "train.c2sp", b / "train.c2sp")  # a file replayed from another dataset
    with pytest.raises(CheckFailed, match="does not authenticate"):
        list(store.read(vault, "b", "train"))
    (a / "train.c2sp").rename(a / "tmp")  # splits swapped within one dataset
    (a / "validation.c2sp").rename(a / "train.c2sp")
    (a / "tmp").rename(a / "validation.c2sp")
    with pytest.raises(CheckFailed):
        list(store.read(vault, "a", "train"))


def test_verify_names_every_damage(vault, home, tmp_path):
    store.write(vault, "good", {"train": _records(5), "validation": _records(2)}, hardware={})
    store.write(vault, "cut", {"train": _records(100), "validation": _records(2)}, hardware={})
    store.write(vault, "flipped", {"train": _records(5), "validation": _records(2)}, hardware={})
    p = store.dataset_dir("cut") / "train.c2sp"
    p.write_bytes(p.read_bytes()[:-100])
    q = store.dataset_dir("flipped") / "validation.c2sp"
    data = bytearray(q.read_bytes())
    data[80] ^= 1
    q.write_bytes(bytes(data))
    report = {r["dataset"]: r for r in store.verify(vault)}
    assert report["good"]["ok"]
    assert not report["cut"]["ok"] and any("train.c2sp" in x for x in report["cut"]["problems"])
    assert not report["flipped"]["ok"] and any("validation.c2sp" in x for x in report["flipped"]["problems"])

    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    proc = run_cli("vault", "verify", home=home, env={"APPLIANCE_PASSPHRASE_FILE": str(pw)}, check=False)
    assert proc.returncode == 3 and "cut, flipped" in proc.stderr and "ok  good" in proc.stdout


def test_a_failed_write_leaves_no_folder_and_no_key(vault, home):
    def records():
        yield from _records(3)
        raise RuntimeError("the source file broke mid-way")

    with pytest.raises(RuntimeError):
        store.write(vault, "half", {"train": records()}, hardware={})
    assert not store.dataset_dir("half").exists()
    assert "half" not in keyring.unlock("correct horse").data["keys"]
    assert [p.name for p in store.dataset_dir("x").parent.iterdir()] == []


def test_duplicate_name_refused(vault):
    store.write(vault, "ds", {"train": _records(1)}, hardware={})
    with pytest.raises(InvalidInput, match="already exists"):
        store.write(vault, "ds", {"train": _records(1)}, hardware={})


def test_remove_crypto_shreds(vault, home):
    store.write(vault, "ds", {"train": _records(2)}, hardware={})
    store.remove(vault, "ds")
    assert not store.dataset_dir("ds").exists()
    assert "ds" not in json.loads(keyring.path().read_text())["keys"]
    with pytest.raises(NotFound):
        list(store.read(vault, "ds", "train"))
    with pytest.raises(NotFound):
        store.remove(vault, "ds")


def _in_a_terminal(args, home, answer: bytes) -> tuple[int, str]:
    """Run the real CLI with a pseudo-terminal as its stdin/stdout, answer its question, return (exit, screen)."""
    import os
    import pty
    import subprocess
    import sys
    import time

    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", *args], stdin=secondary, stdout=secondary,
                            stderr=secondary, env={**os.environ, "APPLIANCE_HOME": str(home)}, close_fds=True)
    os.close(secondary)
    screen, deadline = b"", time.time() + 60
    while b"[y/N]" not in screen and time.time() < deadline:
        screen += os.read(primary, 1024)
    os.write(primary, answer)
    code = proc.wait(timeout=60)
    try:
        while chunk := os.read(primary, 1024):
            screen += chunk
    except OSError:  # the terminal closes with the process
        pass
    os.close(primary)
    return code, screen.decode(errors="replace")


def test_rm_asks_for_confirmation_in_a_terminal(vault, home):
    store.write(vault, "keep", {"train": _records(2)}, hardware={})
    code, screen = _in_a_terminal(["data", "rm", "keep"], home, b"n\n")
    assert "crypto-shred dataset 'keep'? its key is destroyed and cannot be recovered [y/N]" in screen
    assert code == 1 and "nothing removed" in screen
    assert (home / "datasets" / "keep").is_dir() and "keep" in keyring.load()["keys"]
    code, screen = _in_a_terminal(["data", "rm", "keep"], home, b"y\n")
    assert code == 0 and "keep: key destroyed, files removed" in screen
    assert not (home / "datasets" / "keep").exists() and "keep" not in keyring.load()["keys"]
