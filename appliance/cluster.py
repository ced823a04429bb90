"""The cluster: the machines the operator declared for training across machines (the workspace's ``cluster.json``).

Loopback only by default. ``appliance cluster allow HOST[:PORT] ...`` declares peers, by numeric address (a name
would need a resolver, which is egress); a port, when given, is the only port of that peer the appliance's own
code may connect to (the rendezvous); ``cluster list`` and ``cluster revoke HOST`` show and take back. Every
change is in the audit log. A training run with ``--nnodes`` > 1 then lets its own processes, and only them,
connect to exactly the declared peers and listen on this machine's declared address (:func:`enable`); every
other connection is still refused and audited by the egress guard.

The collectives (gloo, NCCL) and c10d's store are C++, out of the guard's sight, so the launcher also checks what
it can: the rendezvous host is a declared peer (a Python probe of the route, which the guard judges), every node
reports the address it reaches the rendezvous from and each node refuses a cluster with an undeclared member,
and the collectives are tied to the interface that holds that address (``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``), so they neither listen on nor route through any other.

**The cluster secret.** c10d's store has no authentication: any host that reaches node 0's port could read what
the nodes say and write an entry of its own. So the nodes share a secret (``appliance cluster secret create`` on
one machine prints it once; ``cluster secret import`` on the others; it is kept in each vault, wrapped like a data
key) and every entry of the agreement is sealed with it (AES-256-GCM under a key derived from it, bound to its
purpose and round, with a fresh challenge from node 0 against replays): a host without the secret reads only
ciphertext, and its entry does not open, so the nodes refuse to start. Node 0 also checks the connections its
store really has (the kernel's table, ``/proc/net/tcp``), not the addresses the nodes claim: a connected peer
that is not a declared member is refused by its address.

**What is not protected**: the gradients (and so, in part, the training text) travel between the nodes
unencrypted over gloo or NCCL. On a network that is not trusted, put the nodes on an encrypted link (WireGuard:
README, "Training across machines") and declare their WireGuard addresses; ``doctor`` says so.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput, NotFound
from .trust import egress

PORT_DEFAULT = 29400  # torchrun's default rendezvous port


def path() -> Path:
    from .workspace import home

    return home() / "cluster.json"


def peers() -> list[dict]:
    """The declared peers: [{"address", "port" (None: any), "added"}]."""
    from .workspace import read_json

    p = path()
    return list(read_json(p).get("peers", [])) if p.is_file() else []


def parse(entry: str, what: str = "peer") -> tuple[str, int | None]:
    """``10.0.0.2``, ``10.0.0.2:29400``, ``fd00::2``, ``[fd00::2]:29400`` -> (address, port or None)."""
    text, port = entry.strip(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            host = ""
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(f"{what} {entry!r} is not a numeric IP address (HOST or HOST:PORT, e.g. 10.0.0.2:"
                           f"{PORT_DEFAULT}); names are refused, as resolving them would ask a DNS server.") from None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise InvalidInput(f"{what} {entry!r}: the port must be a number from 1 to 65535.")
        port = int(port_text)
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidInput(f"{what} {entry!r} is not one machine's address; name the peer's own address.")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def show(address: str, port: int | None) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def allow(entries: list[str]) -> list[dict]:
    """Declare peers (audited, one entry per call); a peer declared again takes the new port. Returns the list."""
    from .trust import audit
    from .workspace import write_json

    parsed = [parse(e) for e in entries]  # all or nothing: one bad entry changes nothing
    known = {p["address"]: p for p in peers()}
    for address, port in parsed:
        known[address] = {"address": address, "port": port,
                          "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(path(), {"peers": sorted(known.values(), key=lambda p: (":" in p["address"], p["address"]))})
    audit.record("cluster.allow", details={"peers": [show(a, p) for a, p in parsed]})
    return peers()


def revoke(entry: str) -> list[dict]:
    from .trust import audit
    from .workspace import write_json

    address, _ = parse(entry)
    known = peers()
    if not any(p["address"] == address for p in known):
        listed = ", ".join(show(p["address"], p["port"]) for p in known) or "none"
        raise NotFound(f"{address} is not a declared peer (declared: {listed}); `appliance cluster list` shows them.")
    write_json(path(), {"peers": [p for p in known if p["address"] != address]})
    audit.record("cluster.revoke", details={"peer": address})
    return peers()


def declared(address: str, port: int | None = None) -> bool:
    """Is ``address`` (and, if the peer was declared with one, ``port``) a declared peer?"""
    try:
        address, _ = parse(address)
    except InvalidInput:
        return False
    return any(p["address"] == address and (p["port"] is None or port is None or p["port"] == port) for p in peers())


def enable(local: str | None = None) -> None:
    """In this process: let the egress guard connect to the declared peers (each at its declared port, or any) and,
    if ``local`` (this machine's address on the cluster's network) is declared, listen on it."""
    for p in peers():
        egress.allow_peer(p["address"], p["port"])
    if local and not egress.is_loopback(local) and declared(local):
        egress.allow_listen(local)


def route_source(host: str, port: int) -> str:
    """This machine's address on the route to ``host``: a UDP socket's connect picks it (no packet is sent). The
    connect goes through the egress guard, so an undeclared host is refused (and audited) here."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (``lo`` for loopback), or None."""
    import socket

    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        try:  # /proc/net/if_inet6: address (32 hex digits), index, prefix length, scope, flags, name
            for line in Path("/proc/net/if_inet6").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 6 and ipaddress.ip_address(int(parts[0], 16)) == ip:
                    return parts[5]
        except OSError:
            return None
        return None
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == str(ip):
                return name
    return None


@dataclass(frozen=True)
class Topology:
    """Where this worker's ranks sit: ``processes`` on this machine, node ``node_rank`` of ``nnodes``, meeting at
    ``rdzv`` (``HOST:PORT`` of node 0; None: loopback, a free port, one machine)."""

    processes: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv: str | None = None

    @property
    def world(self) -> int:
        return self.processes * self.nnodes

    def argv(self) -> list[str]:
        out = ["--processes", str(self.processes)] if self.processes > 1 else []
        if self.nnodes > 1:
            out += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv", self.rdzv]
        return out

    @classmethod
    def from_argv(cls, argv: list[str]) -> "Topology":
        def value(flag, default):
            return argv[argv.index(flag) + 1] if flag in argv else default

        return cls(int(value("--processes", 1)), int(value("--nnodes", 1)), int(value("--node-rank", 0)),
                   value("--rdzv", None))

    def check(self) -> None:
        """A sentence for a topology that cannot work (the CLI checks before it starts anything)."""
        if not 1 <= self.processes <= 64:
            raise InvalidInput(f"--processes {self.processes}: use 1 to 64 (one per GPU).")
        if not 1 <= self.nnodes <= 64:
            raise InvalidInput(f"--nnodes {self.nnodes}: use 1 to 64 machines.")
        if self.nnodes > 1:
            if not 0 <= self.node_rank < self.nnodes:
                raise InvalidInput(f"--node-rank {self.node_rank}: with --nnodes {self.nnodes} use 0 to "
                                   f"{self.nnodes - 1} (0 on the machine that hosts the rendezvous).")
            if not self.rdzv:
                raise InvalidInput("--nnodes needs --rdzv HOST:PORT, the address and port of node 0, the same on "
                                   "every machine.")
            host, port = parse(self.rdzv, "--rdzv")
            if port is None:
                raise InvalidInput(f"--rdzv {self.rdzv}: give the port too, e.g. {show(host, 29400)}.")
            if not egress.is_loopback(host) and not declared(host, port):
                raise InvalidInput(f"--rdzv {self.rdzv} is not a declared peer; on every machine, `appliance cluster "
                                   f"allow {show(host, port)}` (and the other machines' addresses) declares "
                                   "the cluster first.")
        elif self.rdzv or self.node_rank:
            raise InvalidInput("--node-rank and --rdzv are for training across machines; give --nnodes too.")


# -- the cluster secret ---------------------------------------------------------------------------------------------

SECRET = "cluster"
_SECRET_PREFIX = "acs1-"


def _text(secret: bytes) -> str:
    import base64

    return _SECRET_PREFIX + base64.b32encode(secret).decode("ascii").rstrip("=").lower()


def _from_text(text: str) -> bytes:
    import base64

    body = text.strip().lower()
    if not body.startswith(_SECRET_PREFIX):
        raise InvalidInput(f"that is not a cluster secret (it starts with {_SECRET_PREFIX}); copy the whole line "
                           "`appliance cluster secret create` printed.")
    body = body[len(_SECRET_PREFIX):].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InvalidInput("that cluster secret is damaged (not 32 bytes of base32); copy it again.")
    return raw


def secret_fingerprint(secret: bytes) -> str:
    """What nodes compare to know they hold the same secret (it reveals nothing of the secret)."""
    import hashlib
    import hmac

    digest = hmac.new(secret, b"appliance cluster secret fingerprint", hashlib.sha256).hexdigest()[:24]
    return ":".join(digest[i:i + 4] for i in range(0, 24, 4))


def create_secret(vault) -> dict:
    """A new cluster secret in this vault (replacing any other: the other nodes must import the new one)."""
    import os

    from .trust import audit

    secret = os.urandom(32)
    vault.set_secret(SECRET, secret)
    fingerprint = secret_fingerprint(secret)
    audit.record("cluster.secret", details={"action": "create", "fingerprint": fingerprint})
    return {"secret": _text(secret), "fingerprint": fingerprint}


def import_secret(vault, text: str) -> dict:
    from .trust import audit

    secret = _from_text(text)
    vault.set_secret(SECRET, secret)
    fingerprint = secret_fingerprint(secret)
    audit.record("cluster.secret", details={"action": "import", "fingerprint": fingerprint})
    return {"fingerprint": fingerprint}


def secret_of(vault) -> bytes | None:
    return vault.secret(SECRET)


def require_secret(vault) -> bytes:
    secret = secret_of(vault)
    if secret is None:
        raise InvalidInput("training across machines needs the cluster secret in this vault: `appliance cluster "
                           "secret create` on one machine (it prints the secret once), `appliance cluster secret "
                           "import` on each other machine.")
    return secret


def _aead(secret: bytes):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"appliance cluster agreement/1").derive(secret)
    return AESGCM(key)


def seal(secret: bytes, purpose: str, obj) -> str:
    """``obj`` as JSON, encrypted and authenticated with the cluster secret, bound to ``purpose``."""
    import base64
    import json
    import os

    nonce = os.urandom(12)
    sealed = nonce + _aead(secret).encrypt(nonce, json.dumps(obj, sort_keys=True).encode(), purpose.encode())
    return base64.b64encode(sealed).decode("ascii")


def unseal(secret: bytes, purpose: str, text) -> dict | None:
    """What ``seal`` sealed for ``purpose`` with this secret; None if it was not (another secret, another purpose,
    changed, or not sealed at all)."""
    import base64
    import json

    from cryptography.exceptions import InvalidTag

    try:
        raw = base64.b64decode(text if isinstance(text, (bytes, str)) else b"", validate=True)
        return json.loads(_aead(secret).decrypt(raw[:12], raw[12:], purpose.encode()))
    except (InvalidTag, ValueError, TypeError):
        return None


def connected_peers(port: int) -> set[str]:
    """The remote addresses of this machine's established TCP connections to local ``port``, read from the
    kernel's tables (``/proc/net/tcp``, ``tcp6``): who really is connected to the rendezvous, whatever they claim."""
    out = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) != port:
                continue
            out.add(_proc_address(remote.rsplit(":", 1)[0], width))
    return out


def _proc_address(hexed: str, width: int) -> str:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)
