"""The limits of `appliance serve`: what one request, one tenant and one client address may take.

Server-wide (``serve`` flags): the body's size, checked against ``Content-Length`` before a byte of it is read
and again while it streams in; how many messages one request may carry; how long a client may take to send its
headers and then its body; how many connections are open at once, in all and from one address. Per tenant
(``serve limits TENANT``, kept in ``serve/limits.json``, audited): the largest ``max_tokens`` and how many of
its requests run at once. A request without ``max_tokens`` gets the tenant's limit, so no answer runs until
the context is full because a client forgot it.

The connection limits live in the HTTP protocol (:func:`protocol`), below the application: a client that sends
its headers a byte at a time (slowloris) never reaches the app, so only the transport can time it out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20          # 1 MiB: ~250k tokens of text, far above any context served here
    max_messages: int = 256
    header_timeout_s: float = 10.0         # from the connection (or the last answer) to the request's last header
    body_timeout_s: float = 30.0
    max_connections: int = 256
    max_connections_per_address: int = 32
    max_tokens: int = 1024                 # per tenant: the default and the ceiling of max_tokens
    concurrent: int = 8                    # per tenant: requests in progress at once (more: 429)


TENANT_FIELDS = ("max_tokens", "concurrent")


def _file() -> Path:
    from .keys import serve_dir

    return serve_dir() / "limits.json"


def tenant_overrides() -> dict[str, dict[str, int]]:
    from ..workspace import read_json

    path = _file()
    return dict(read_json(path).get("tenants", {})) if path.is_file() else {}


def set_tenant(tenant: str, max_tokens: int | None = None, concurrent: int | None = None,
               reset: bool = False) -> dict[str, int]:
    """Set (or with ``reset`` remove) a tenant's own limits; audited. Returns what the tenant has now."""
    from ..trust import audit
    from ..workspace import write_json
    from .keys import check_tenant

    check_tenant(tenant)
    for name, value in (("--max-tokens", max_tokens), ("--concurrent", concurrent)):
        if value is not None and value < 1:
            raise InvalidInput(f"{name} must be at least 1; got {value}.")
    table = tenant_overrides()
    own = {} if reset else dict(table.get(tenant, {}))
    own.update({k: v for k, v in (("max_tokens", max_tokens), ("concurrent", concurrent)) if v is not None})
    if own:
        table[tenant] = own
    else:
        table.pop(tenant, None)
    write_json(_file(), {"format": 1, "tenants": table})
    audit.record("serve.limits", subjects={"tenant": tenant}, details={"tenant": tenant, **own, "reset": reset})
    return own


class TenantLimits:
    """The server's defaults with each tenant's own values on top; ``limits.json`` re-read when it changes."""

    def __init__(self, defaults: Limits):
        self.defaults = defaults
        self._path = _file()
        self._stamp: tuple | None = None
        self._table: dict[str, dict[str, int]] = {}

    def of(self, tenant: str) -> Limits:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._table = tenant_overrides() if stamp else {}
            self._stamp = stamp
        own = {k: v for k, v in self._table.get(tenant, {}).items() if k in TENANT_FIELDS}
        return replace(self.defaults, **own) if own else self.defaults


def describe(limits: Limits) -> dict:
    return asdict(limits)


def protocol(limits: Limits):
    """uvicorn's h11 protocol with the connection limits: a cap on open connections (in all and per client
    address; beyond it the connection is closed before anything is read) and a deadline for the headers, from
    the connection or from the end of the previous answer on a kept-alive one. (The body's deadline is the
    app's, which can still answer 408 then.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            per = self.server_state.__dict__.setdefault("appliance_per_address", {})
            self._address = self.client[0] if self.client else ""
            self._counted = False
            self._deadline = None
            if len(self.connections) > limits.max_connections or \
                    per.get(self._address, 0) >= limits.max_connections_per_address:
                transport.close()
                return
            per[self._address] = per.get(self._address, 0) + 1
            self._counted = True
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._counted:
                per = self.server_state.__dict__["appliance_per_address"]
                per[self._address] -= 1
                if per[self._address] <= 0:
                    del per[self._address]
                self._counted = False
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: the app takes it from here

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # no whole request arrived in time: nobody to answer

    Guarded.__name__ = "GuardedH11Protocol"
    return Guarded
