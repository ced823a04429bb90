"""The vault's keyring: KDFs, wrapping, wrong passphrases, rekey (crash-safe), crypto-shredding."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import InvalidInput, NotFound
from appliance.trust import keyring
from conftest import run_cli

WRAP = json.loads((Path(__file__).parent / "vectors/wycheproof/aes_wrap_test.json").read_text())


@pytest.mark.parametrize("t", [t for g in WRAP["testGroups"] for t in g["tests"]], ids=lambda t: f"tc{t['tcId']}")
def test_aes_key_wrap_against_wycheproof(t):
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

    key, msg, ct = (bytes.fromhex(t[k]) for k in ("key", "msg", "ct"))
    if t["result"] == "valid":
        assert aes_key_wrap(key, msg) == ct and aes_key_unwrap(key, ct) == msg
    elif t["result"] == "invalid":
        with pytest.raises((InvalidUnwrap, ValueError)):
            assert aes_key_unwrap(key, ct) == msg


@pytest.mark.parametrize("kdf, params", [("scrypt", {"n": 2**17, "r": 8, "p": 1}),
                                         ("pbkdf2-sha256", {"iterations": 600_000}),
                                         ("argon2id", {"memory_kib": 19456, "iterations": 2, "lanes": 1})])
def test_each_kdf_records_its_parameters_and_opens(home, kdf, params):
    v = keyring.init("correct horse", kdf=kdf)
    key = v.add_key("ds1")
    raw = json.loads(keyring.path().read_text())
    assert raw["kdf"]["name"] == kdf and {k: raw["kdf"][k] for k in params} == params
    assert len(keyring._b64d(raw["kdf"]["salt"])) == 16
    assert keyring.unlock("correct horse").data_key("ds1") == key
    assert oct(keyring.path().stat().st_mode & 0o777) == "0o600"


def test_wrong_passphrase_is_a_clear_error(home):
    keyring.init("correct horse")
    with pytest.raises(keyring.WrongPassphrase, match="does not open the vault"):
        keyring.unlock("correct hose")


def test_rekey_rewraps_and_reencrypts_nothing(home):
    v = keyring.init("old passphrase")
    keys = {ds: v.add_key(ds) for ds in ("a", "b")}
    before = json.loads(keyring.path().read_text())
    keyring.rekey("old passphrase", "new passphrase", kdf="pbkdf2-sha256")
    after = json.loads(keyring.path().read_text())
    assert after["kdf"]["salt"] != before["kdf"]["salt"]
    assert all(after["keys"][ds]["wrapped"] != before["keys"][ds]["wrapped"] for ds in keys)
    opened = keyring.unlock("new passphrase")
    assert {ds: opened.data_key(ds) for ds in keys} == keys  # same data keys: no data needs re-encrypting
    with pytest.raises(keyring.WrongPassphrase):
        keyring.unlock("old passphrase")


def test_a_failed_rekey_leaves_the_old_keyring(home, monkeypatch):
    v = keyring.init("old passphrase")
    key = v.add_key("a")
    import appliance.workspace as ws

    def crash(*a, **k):
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(ws.os, "replace", crash)
        with pytest.raises(OSError):
            keyring.rekey("old passphrase", "new passphrase")
    assert keyring.unlock("old passphrase").data_key("a") == key
    assert [p.name for p in home.iterdir() if p.name.startswith(".tmp-")] == []


def test_kill_9_at_any_point_of_a_rekey_leaves_a_keyring_that_opens(home, tmp_path):
    """Kill the real CLI just before and just after the keyring's replace (fault points, not guessed delays: a rekey
    spends seconds in two KDF runs first); each time the keyring opens, with the old or the new passphrase."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("old passphrase\n")
    new.write_text("new passphrase\n")
    v = keyring.init("old passphrase")
    key = v.add_key("a")

    def rekey_killed_at(point: str, current: Path, other: Path) -> Path:
        env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_PASSPHRASE_FILE": str(current),
               "APPLIANCE_NEW_PASSPHRASE_FILE": str(other), "APPLIANCE_FAULT": f"kill_at:{point}:keyring.json"}
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "vault", "rekey"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == -signal.SIGKILL  # the fault point was reached: the kill landed there
        opened = []
        for candidate in (current, other):
            try:
                opened.append((candidate, keyring.unlock(candidate.read_text().strip()).data_key("a")))
            except keyring.WrongPassphrase:
                pass
        assert len(opened) == 1 and opened[0][1] == key
        return opened[0][0]

    # Killed before the replace: the old keyring stands (the finished temporary file is only litter) ...
    assert rekey_killed_at("before_replace", old, new) == old
    # ... killed after it: the new one does, though the command never got to say so.
    assert rekey_killed_at("after_replace", old, new) == new
    assert rekey_killed_at("before_replace", new, old) == new
    assert rekey_killed_at("after_replace", new, old) == old


def test_destroy_key_crypto_shreds(home):
    v = keyring.init("correct horse")
    v.add_key("a")
    assert v.destroy_key("a") is True
    with pytest.raises(NotFound, match="no key for dataset 'a'"):
        keyring.unlock("correct horse").data_key("a")
    assert json.loads(keyring.path().read_text())["keys"] == {}


def test_damaged_keyring_is_named(home):
    keyring.init("correct horse")
    keyring.path().write_text("{not json")
    with pytest.raises(InvalidInput, match="damaged"):
        keyring.unlock("correct horse")


def test_cli_vault_commands(home, tmp_path):
    pw, pw2 = tmp_path / "pw", tmp_path / "pw2"
    pw.write_text("correct horse\n")
    pw2.write_text("battery staple\n")
    env = {"APPLIANCE_PASSPHRASE_FILE": str(pw)}
    assert "scrypt" in run_cli("vault", "init", home=home, env=env).stdout
    st = json.loads(run_cli("vault", "status", "--json", home=home).stdout)
    assert st["kdf"]["name"] == "scrypt" and "salt" not in st["kdf"] and st["datasets"] == []
    again = run_cli("vault", "init", home=home, env=env, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong = run_cli("vault", "rekey", home=home, env={"APPLIANCE_PASSPHRASE_FILE": str(pw2),
                                                      "APPLIANCE_NEW_PASSPHRASE_FILE": str(pw)}, check=False)
    assert wrong.returncode == 2 and "does not open the vault" in wrong.stderr and "Traceback" not in wrong.stderr
    run_cli("vault", "rekey", home=home, env={**env, "APPLIANCE_NEW_PASSPHRASE_FILE": str(pw2)})
    keyring.unlock("battery staple")
    nopass = run_cli("vault", "rekey", home=home, env={"APPLIANCE_PASSPHRASE_FILE": ""}, check=False)
    assert nopass.returncode == 2 and "no passphrase" in nopass.stderr
