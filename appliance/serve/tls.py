"""TLS for `appliance serve` beyond loopback: a certificate pair, made here or brought by the operator.

On an isolated network there is usually no certificate authority, so ``serve cert --host IP`` makes a
self-signed pair (an ECDSA P-256 key, the address in the certificate's subjectAltName, valid for ``--days``) and
prints the certificate's SHA-256 fingerprint: a client pins either the certificate file itself (``--cacert``,
``httpx.Client(verify="cert.pem")``) or compares the fingerprint it is shown. An operator with their own CA gives
its files to ``serve --tls-cert/--tls-key`` instead. The key is written 0600 and never leaves the workspace.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from ..errors import InvalidInput


def tls_dir() -> Path:
    from .keys import serve_dir

    folder = serve_dir() / "tls"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def fingerprint(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(cert_pem)
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def make_pair(host: str, days: int = 365, out: Path | None = None) -> dict:
    """A self-signed certificate for ``host`` (a numeric address) and its key; audited. Returns the paths and
    the fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ..trust import audit
    from ..workspace import atomic_writer

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise InvalidInput(f"--host {host!r} is not a numeric IP address; give the address clients will "
                           "connect to.") from None
    if not 1 <= days <= 3650:
        raise InvalidInput(f"--days must be between 1 and 3650; got {days}.")
    folder = Path(out) if out else tls_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"appliance serve {ip}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    tag = str(ip).replace(":", "_")
    cert_path, key_path = folder / f"serve-{tag}.crt", folder / f"serve-{tag}.key"
    for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
        with atomic_writer(path) as f:  # mkstemp's mode: 0600
            f.write(data)
    print_ = fingerprint(cert_pem)
    audit.record("serve.tls.create", details={"host": str(ip), "days": days, "sha256": print_})
    return {"cert": str(cert_path), "key": str(key_path), "host": str(ip), "sha256": print_,
            "expires": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}


def check_pair(cert: str | Path, key: str | Path) -> str:
    """Load the pair as the server will; one sentence if it cannot. Returns the certificate's fingerprint."""
    import ssl

    cert, key = Path(cert).expanduser(), Path(key).expanduser()
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise InvalidInput(f"{flag} {path} does not exist; `appliance serve cert --host ADDRESS` makes a pair.")
    if os.stat(key).st_mode & 0o077:
        raise InvalidInput(f"--tls-key {key} can be read by other users; `chmod 600 {key}` first.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise InvalidInput(f"--tls-cert {cert} and --tls-key {key} are not a matching PEM certificate and key "
                           f"({e.reason or e}).") from None
    return fingerprint(cert.read_bytes())


def pair_for(host: str) -> tuple[str, str] | None:
    """The pair `serve cert --host HOST` made in the workspace, if there is one."""
    tag = str(ipaddress.ip_address(host.strip("[]"))).replace(":", "_")
    cert, key = tls_dir() / f"serve-{tag}.crt", tls_dir() / f"serve-{tag}.key"
    return (str(cert), str(key)) if cert.is_file() and key.is_file() else None
