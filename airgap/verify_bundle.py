#!/usr/bin/env python3
"""Verify an offline install bundle before anything in it runs.

Standard library only, on purpose: the isolated machine may have no
``cryptography``, and installing it from the bundle in order to check the
bundle's signature would run the bundle's code before the bundle is
authenticated (a forged bundle could carry a ``cryptography`` that accepts
anything). So the Ed25519 signature is checked with the RFC 8032 reference
verification below (public data only: no secret, hence no timing concern),
tested against RFC 8032's vectors and against ``cryptography``.

What is checked, in this order:

1. the trusted key: the bundled ``signing-key.pub`` must equal the key given
   with ``--pubkey`` or have the fingerprint given with ``--fingerprint``
   (sha256 of the 32 raw public-key bytes, hex); with neither, the bundled key
   is used and a warning says authenticity was not checked;
2. ``SHA256SUMS.sig``: the Ed25519 signature (64 raw bytes) over ``SHA256SUMS``;
3. ``SHA256SUMS``: every file of the bundle is listed (no unlisted file, no
   symbolic link, no special file), every listed file exists, and each sha256
   matches.

The same checks by hand, with stock tools::

    openssl pkeyutl -verify -pubin -inkey signing-key.pub -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig
    sha256sum -c SHA256SUMS        # plus: no file missing from the list
    openssl pkey -pubin -in signing-key.pub -outform DER | tail -c 32 | sha256sum   # the fingerprint

Usage: ``python3 verify_bundle.py BUNDLE_DIR [--pubkey FILE | --fingerprint HEX]``
(exit 0: verified; 1: refused, with one sentence on stderr).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

SUMS = "SHA256SUMS"
SIG = "SHA256SUMS.sig"
PUBKEY = "signing-key.pub"
UNLISTED = frozenset({SUMS, SIG})  # the only files SHA256SUMS does not list

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING }
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class BundleError(Exception):
    """A refused bundle; the message is one sentence for the administrator."""


@dataclass
class Verified:
    """What a successful verification established."""

    root: Path
    fingerprint: str
    trusted: bool  # False: checked only against the key the bundle carries
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    contents: dict[str, bytes] = field(default_factory=dict)  # small files read once, as verified


# --------------------------------------------------------------------------------------------
# Ed25519 verification, RFC 8032 section 5.1.7 (cofactorless, as the RFC's reference code and OpenSSL)

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _same(p, q) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


def _decode_point(s: bytes):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key`` (32 raw bytes)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode_point(public_key)
    r = _decode_point(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    return _same(_mul(s, _G), _add(r, _mul(h, a)))


# --------------------------------------------------------------------------------------------
# keys


def fingerprint(raw_public_key: bytes) -> str:
    """The key's fingerprint: sha256 of the 32 raw public-key bytes, lower-case hex."""
    return hashlib.sha256(raw_public_key).hexdigest()


def public_key_from_pem(text: bytes, where: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key in PEM (SubjectPublicKeyInfo) form."""
    m = re.search(rb"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", text, re.DOTALL)
    if not m:
        raise BundleError(f"{where} is not a PEM public key (no BEGIN PUBLIC KEY block).")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except ValueError:
        raise BundleError(f"{where} is not a PEM public key (its base64 does not decode).") from None
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise BundleError(f"{where} is not an Ed25519 public key.")
    return der[len(_SPKI_PREFIX):]


def public_key_to_pem(raw: bytes) -> bytes:
    b64 = base64.b64encode(_SPKI_PREFIX + raw).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n".encode()


def normalize_fingerprint(text: str) -> str:
    fp = re.sub(r"[\s:]", "", text).lower()
    fp = fp.removeprefix("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise BundleError(f"the fingerprint {text!r} is not 64 hexadecimal digits (sha256 of the public key).")
    return fp


# --------------------------------------------------------------------------------------------
# the bundle

_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def parse_sums(data: bytes) -> dict[str, str]:
    """``SHA256SUMS`` (sha256sum's format, POSIX relative paths) -> {path: sha256}."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{SUMS} is not UTF-8 text.") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _LINE.fullmatch(line)
        if not m:
            raise BundleError(f"{SUMS} line {n} is not '<sha256>  <path>'.")
        digest, rel = m.groups()
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            raise BundleError(f"{SUMS} line {n} names a path outside the bundle: {rel!r}.")
        if rel in out:
            raise BundleError(f"{SUMS} lists {rel} twice.")
        if rel in UNLISTED:
            raise BundleError(f"{SUMS} lists {rel}, which it cannot cover.")
        out[rel] = digest
    if not out:
        raise BundleError(f"{SUMS} lists no files.")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _walk(root: Path) -> list[str]:
    """Every entry under root as a relative POSIX path; refuses links and special files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"the bundle contains a symbolic link, {rel}, which it may not.")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"the bundle contains {rel}, which is not a regular file.")
            found.append(rel)
    return found


def _read(root: Path, name: str) -> bytes:
    p = root / name
    if p.is_symlink() or not p.is_file():
        raise BundleError(f"the bundle at {root} has no {name}.")
    return p.read_bytes()


def verify(bundle: str | os.PathLike, *, pubkey: bytes | None = None, fingerprint_hex: str | None = None,
           keep: tuple[str, ...] = ("requirements.txt", "requirements-model.txt", "bundle.json")) -> Verified:
    """Verify the bundle at ``bundle``; raise BundleError (one sentence) if anything is wrong.

    ``pubkey``: the trusted key's 32 raw bytes; ``fingerprint_hex``: its fingerprint. The files
    named in ``keep`` are read once, checked, and returned in ``Verified.contents`` so that a caller
    uses exactly the bytes that were verified."""
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder (expected an offline install bundle).")
    bundled = public_key_from_pem(_read(root, PUBKEY), f"the bundle's {PUBKEY}")
    fp = fingerprint(bundled)
    if pubkey is not None and fingerprint_hex is not None:
        raise BundleError("give the trusted key either as a public key file or as a fingerprint, not both.")
    if pubkey is not None and pubkey != bundled:
        raise BundleError(f"the bundle is signed by key {fp}, not by the trusted key {fingerprint(pubkey)}; refused.")
    if fingerprint_hex is not None and normalize_fingerprint(fingerprint_hex) != fp:
        raise BundleError(f"the bundle is signed by key {fp}, not by the trusted key "
                          f"{normalize_fingerprint(fingerprint_hex)}; refused.")
    trusted = pubkey is not None or fingerprint_hex is not None

    sums = _read(root, SUMS)
    sig = _read(root, SIG)
    if not ed25519_verify(bundled, sums, sig):
        raise BundleError(f"the signature {SIG} does not match {SUMS} under key {fp}; the bundle was altered.")

    listed = parse_sums(sums)
    present = set(_walk(root)) - UNLISTED
    extra = sorted(present - set(listed))
    if extra:
        raise BundleError(f"the bundle contains {extra[0]}, which {SUMS} does not list"
                          + (f" (and {len(extra) - 1} more unlisted files)." if len(extra) > 1 else "."))
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"{missing[0]} is listed in {SUMS} but missing from the bundle"
                          + (f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."))
    out = Verified(root=root, fingerprint=fp, trusted=trusted, files=listed)
    for rel in sorted(listed):
        if rel in keep:
            data = (root / rel).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            out.contents[rel] = data
        else:
            digest = sha256_file(root / rel)
        if digest != listed[rel]:
            raise BundleError(f"{rel} does not match its sha256 in {SUMS}; the file was altered or damaged.")
    return out


def load_trusted_pubkey(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the trusted public key {p}: {e.strerror}.") from None
    return public_key_from_pem(data, f"the trusted public key {p}")


UNTRUSTED_WARNING = ("warning: no trusted key was given (--pubkey or --fingerprint): the bundle is intact and "
                     "signed by the key it carries, {fp}, but its authenticity was NOT checked; compare that "
                     "fingerprint with the one the bundle's builder gave you out of band.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="verify_bundle.py", description="Verify an offline install bundle.")
    ap.add_argument("bundle")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--pubkey", metavar="FILE", help="the trusted Ed25519 public key (PEM)")
    g.add_argument("--fingerprint", metavar="HEX", help="the trusted key's fingerprint (sha256 of the raw key, hex)")
    args = ap.parse_args(argv)
    try:
        key = load_trusted_pubkey(args.pubkey) if args.pubkey else None
        v = verify(args.bundle, pubkey=key, fingerprint_hex=args.fingerprint)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not v.trusted:
        print(UNTRUSTED_WARNING.format(fp=v.fingerprint), file=sys.stderr)
    print(f"verified: {len(v.files)} files, signed by key {v.fingerprint}"
          + (" (the trusted key)" if v.trusted else " (the bundle's own key)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
