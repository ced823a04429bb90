"""Dataset packages: an encrypted dataset carried to a second machine (a second workspace with its own vault and
passphrase), opened there with the package passphrase; ciphertext only on the way, every check before anything
is stored, and the same records on both machines."""

import hashlib
import json
import shutil

from conftest import PASSPHRASE, cli_json, run_cli

CANARY = "CANARY-5d1e-package-plaintext-must-not-travel"
PACKAGE_PASSPHRASE = "package passphrase 42"


def _dataset(path):
    rows = [{"messages": [{"role": "user", "content": f"{CANARY} question number {i} about the ledger entries"},
                          {"role": "assistant", "content": f"answer {i}: the balance is {i * 17} units today"}]}
            for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _other_machine(tmp_path):
    """Another workspace with a vault of its own, under another passphrase."""
    home, pw = tmp_path / "node1", tmp_path / "node1-passphrase"
    pw.write_text("the other machine's passphrase")
    env = {"APPLIANCE_PASSPHRASE_FILE": str(pw)}
    run_cli("vault", "init", "--kdf", "pbkdf2-sha256", home=home, env=env)
    return home, env


def _all_bytes(root):
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_a_package_carries_ciphertext_and_opens_on_another_machine_with_its_own_passphrase(vault_home, tmp_path):
    src = vault_home
    run_cli("data", "import", str(_dataset(tmp_path / "ledger.jsonl")), "--name", "ledger", home=src)
    pw = tmp_path / "package-passphrase"
    pw.write_text(PACKAGE_PASSPHRASE)
    pkg_env = {"APPLIANCE_PACKAGE_PASSPHRASE_FILE": str(pw)}
    made = cli_json("data", "package", "ledger", str(tmp_path / "pkg"), "--kdf", "pbkdf2-sha256", home=src,
                    env=pkg_env)
    pkg = tmp_path / "pkg"
    assert made["records"]["train"] + made["records"]["validation"] + made["records"]["test"] == 40
    # What travels: ciphertext under opaque names and one signed index; no text, no passphrase, no vault key, and
    # nothing about the dataset in clear: not its name, its source file, its plaintext's digest, its counts.
    assert sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()) == [
        "package.json", "part-1.c2sp", "part-2.c2sp", "part-3.c2sp", "part-4.c2sp"]
    index = json.loads((pkg / "package.json").read_text())
    assert sorted(index) == ["format", "kdf", "parts", "sealed", "signature", "signer", "wrapped_key"]
    travelled = _all_bytes(pkg)
    source_digest = hashlib.sha256((tmp_path / "ledger.jsonl").read_bytes()).hexdigest()
    vault_manifest = json.loads((src / "datasets" / "ledger" / "manifest.json").read_text())
    for secret in (CANARY, PACKAGE_PASSPHRASE, PASSPHRASE, "ledger entries", "ledger", source_digest, "records",
                   vault_manifest["created"][:16]):
        assert secret.encode() not in travelled, secret
    assert (pkg / "part-3.c2sp").read_bytes() == (src / "datasets" / "ledger" / "train.c2sp").read_bytes()

    # The maker's side refuses a guessable package passphrase, and offers a strong one.
    weak = tmp_path / "weak"
    weak.write_text("password1")
    refused = run_cli("data", "package", "ledger", str(tmp_path / "pkg-weak"), home=src, check=False,
                      env={"APPLIANCE_PACKAGE_PASSPHRASE_FILE": str(weak)})
    assert refused.returncode == 2 and "too weak" in refused.stderr and not (tmp_path / "pkg-weak").exists()
    generated = cli_json("data", "package", "ledger", str(tmp_path / "pkg-gen"), "--generate-passphrase",
                         "--kdf", "pbkdf2-sha256", home=src)
    assert len(generated["passphrase"].split("-")) == 6
    assert generated["passphrase"].encode() not in _all_bytes(tmp_path / "pkg-gen")

    other, env = _other_machine(tmp_path)
    mine = cli_json("vault", "status", home=other)
    # A wrong package passphrase, a signer other than the one expected, a changed byte: one sentence, nothing kept.
    wrong_pw = tmp_path / "wrong"
    wrong_pw.write_text("not the package passphrase")
    failures = [
        (run_cli("data", "import", str(pkg), home=other, check=False, env={**env, **pkg_env}),
         f"is signed by the key {made['signer']}; name the key you expect with --signer"),
        (run_cli("data", "import", str(pkg), "--signer", made["signer"], home=other, check=False,
                 env={**env, "APPLIANCE_PACKAGE_PASSPHRASE_FILE": str(wrong_pw)}),
         "the package passphrase does not open"),
        (run_cli("data", "import", str(pkg), "--signer", "ab" * 32, home=other, check=False, env={**env, **pkg_env}),
         "not by the one you named"),
        (run_cli("data", "import", str(pkg), "--name", "renamed", "--signer", made["signer"], home=other,
                 check=False, env={**env, **pkg_env}),
         "a package keeps its dataset's name"),
    ]
    tampered = tmp_path / "tampered"
    shutil.copytree(pkg, tampered)
    data = bytearray((tampered / "part-3.c2sp").read_bytes())
    data[100] ^= 1
    (tampered / "part-3.c2sp").write_bytes(bytes(data))
    failures.append((run_cli("data", "import", str(tampered), "--signer", made["signer"], home=other, check=False,
                             env={**env, **pkg_env}), "does not match its sha256"))
    # A hostile package asking the KDF for 128 GiB is refused before anything is derived (the bounds come first,
    # so even a validly signed one could not).
    greedy = tmp_path / "greedy"
    shutil.copytree(pkg, greedy)
    edited = json.loads((greedy / "package.json").read_text())
    edited["kdf"].update(name="scrypt", n=2**30, r=8, p=1)
    edited["kdf"].pop("iterations", None)
    (greedy / "package.json").write_text(json.dumps(edited))
    failures.append((run_cli("data", "import", str(greedy), "--signer", made["signer"], home=other, check=False,
                             env={**env, **pkg_env}), "outside what this appliance accepts"))
    for proc, words in failures:
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (other / "datasets" / "ledger").exists()
    assert cli_json("vault", "status", home=other)["datasets"] == mine["datasets"] == []

    opened = cli_json("data", "import", str(pkg), "--signer", made["signer"], home=other, env={**env, **pkg_env})
    assert opened["dataset"] == "ledger" and opened["records"] == made["records"]
    assert CANARY.encode() not in _all_bytes(other)  # still only ciphertext on the second machine
    # The key is now wrapped under the other vault's passphrase: the same records decrypt on both machines.
    for split in ("train", "validation", "test"):
        a = cli_json("data", "show", "ledger", "--split", split, "-n", "100", home=src)["records"]
        b = cli_json("data", "show", "ledger", "--split", split, "-n", "100", home=other, env=env)["records"]
        assert a == b and a
    assert cli_json("vault", "verify", home=other, env=env)["ok"]
    lineage = cli_json("verify", str(other / "datasets" / "ledger"), home=other, env=env)
    assert lineage["ok"], lineage  # a manifest of the second machine's own, naming the maker's key
    details = json.loads((other / "datasets" / "ledger" / "manifest.json").read_text())["details"]
    assert details["packaged"]["signer"] == made["signer"]
    again = run_cli("data", "import", str(pkg), "--signer", made["signer"], home=other, check=False,
                    env={**env, **pkg_env})
    assert again.returncode != 0 and "already exists here" in again.stderr

    from appliance.trust import audit

    assert audit.entries(event="dataset.package")[-1]["details"]["signer"] == made["signer"]
