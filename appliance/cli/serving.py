"""`appliance serve`: the OpenAI-compatible endpoint, its keys and where it may listen.

``serve keys ...``, ``serve allow ...`` and ``serve status`` are groups of their own under ``serve`` (``main``
routes ``serve keys`` to the hidden ``serve-keys`` parser), since ``serve MODEL`` takes any model name.
"""

from __future__ import annotations

import sys

from ..serve.limits import Limits
from .common import command, print_json, rich_console

GROUPS = ("keys", "allow", "status", "cert", "limits")


def parsers(add) -> None:
    s = add("serve", "an OpenAI-compatible endpoint on loopback for a run, a model or a .gguf "
                     "(also: serve keys create|list|revoke, serve allow ADDRESS, serve cert, serve limits, "
                     "serve status)")
    s.add_argument("model", help="a run id (its exported GGUF), a model id or a .gguf file; with --adapter, the base")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); another needs `appliance serve allow ADDRESS`")
    s.add_argument("--parallel", type=int, default=4, help="requests answered together (llama-server slots; default 4)")
    s.add_argument("--ctx", type=int, default=2048, help="context tokens per request slot (default 2048)")
    s.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: its own choice)")
    s.add_argument("--adapter", action="append", metavar="TENANT=RUN",
                   help="serve TENANT through RUN's LoRA adapter on the one base MODEL (repeat per tenant); needs "
                        "`appliance export RUN --adapter`")
    s.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (`serve cert` makes one)")
    s.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (mode 0600)")
    s.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback --host without TLS (keys and prompts in clear; audited)")
    d = Limits()
    s.add_argument("--max-body", type=int, default=d.max_body_bytes, metavar="BYTES",
                   help=f"largest request body (default {d.max_body_bytes})")
    s.add_argument("--max-messages", type=int, default=d.max_messages,
                   help=f"most messages in one chat request (default {d.max_messages})")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"default and ceiling of max_tokens for tenants without their own (default {d.max_tokens})")
    s.add_argument("--concurrent", type=int, default=d.concurrent,
                   help=f"requests of one tenant in progress at once (default {d.concurrent}; more get 429)")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections in all (default {d.max_connections}; "
                        f"{d.max_connections_per_address} per client address)")
    s.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="SECONDS",
                   help=f"time a client has to send a request's headers (default {d.header_timeout_s:g})")
    s.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                   help=f"time a client has to send a request's body (default {d.body_timeout_s:g})")

    k = add("serve-keys", "API keys of `appliance serve` (only their hashes are kept)", json_out=False, hidden=True,
            prog="appliance serve keys")
    ksub = k.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    kc = ksub.add_parser("create", help="make a key for a tenant; it is printed once and never stored")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list", help="the keys: id, tenant, created, revoked (never the key)")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", help="revoke a key by its id, or every key of a tenant by its name")
    kr.add_argument("which", metavar="ID|TENANT")
    kr.add_argument("--json", action="store_true")

    a = add("serve-allow", "declare a non-loopback address `serve --host` may listen on (audited)", hidden=True,
            prog="appliance serve allow")
    a.add_argument("address", nargs="?", help="a numeric IP address of this machine (none: list what is allowed)")
    a.add_argument("--remove", action="store_true", help="withdraw the address")

    add("serve-status", "the servers of this workspace that are running, and what they served", hidden=True,
        prog="appliance serve status")

    c = add("serve-cert", "make a self-signed TLS certificate for `serve --host ADDRESS` and print its fingerprint",
            hidden=True, prog="appliance serve cert")
    c.add_argument("--host", required=True, help="the numeric address clients connect to")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--out", help="folder for the pair (default: the workspace's serve/tls)")

    lim = add("serve-limits", "a tenant's own max_tokens and concurrency (none: list them; audited)", hidden=True,
              prog="appliance serve limits")
    lim.add_argument("tenant", nargs="?")
    lim.add_argument("--max-tokens", type=int, help="ceiling and default of max_tokens for this tenant")
    lim.add_argument("--concurrent", type=int, help="requests of this tenant in progress at once")
    lim.add_argument("--reset", action="store_true", help="back to the server's defaults")


def rewrite(argv: list[str]) -> list[str]:
    """``serve keys create ...`` -> ``serve-keys create ...`` (and allow, status)."""
    if len(argv) >= 2 and argv[0] == "serve" and argv[1] in GROUPS:
        return [f"serve-{argv[1]}", *argv[2:]]
    return argv


@command("serve")
def _serve(args) -> int:
    from ..serve import Server

    from ..errors import InvalidInput

    for flag, value in (("--max-body", args.max_body), ("--max-messages", args.max_messages),
                        ("--max-tokens", args.max_tokens), ("--concurrent", args.concurrent),
                        ("--max-connections", args.max_connections), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout)):
        if value <= 0:
            raise InvalidInput(f"{flag} must be more than 0; got {value}.")
    limits = Limits(max_body_bytes=args.max_body, max_messages=args.max_messages, max_tokens=args.max_tokens,
                    concurrent=args.concurrent, max_connections=args.max_connections,
                    max_connections_per_address=min(Limits.max_connections_per_address, args.max_connections),
                    header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)
    server = Server(args.model, port=args.port, host=args.host, parallel=args.parallel, ctx=args.ctx,
                    threads=args.threads, adapters=args.adapter, limits=limits, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, insecure=args.insecure)

    def ready(s) -> None:
        if args.json:
            print_json({"ready": True, **s.state()})
        else:
            tenants = ", ".join(s.plan.tenants) if s.plan.tenants else "every tenant with a key"
            print(f"serving {s.plan.name} at {s.url} (llama-server, {s.parallel} slots; {tenants}); Ctrl-C stops")
            if s.fingerprint:
                print(f"TLS certificate sha256 {s.fingerprint}: clients pin this certificate")
            elif s.insecure:
                print(f"warning: {s.host} is served without TLS (--insecure): keys, prompts and answers cross the "
                      "network in clear", file=sys.stderr)
        sys.stdout.flush()

    result = server.run(on_ready=ready)
    if args.json:
        print_json({"stopped": True, **result})
    else:
        served = result["usage"]["tenants"]
        print(f"stopped; requests served: {sum(t['requests'] for t in served.values())}, refused for want of a "
              f"valid key: {result['usage']['denied']}")
    return 0


@command("serve-keys create")
def _keys_create(args) -> int:
    from ..serve import keys

    made = keys.create(args.tenant)
    if args.json:
        print_json(made)
    else:
        print(made["key"])
        print(f"key {made['id']} for tenant {made['tenant']}: shown this once, only its hash is kept", file=sys.stderr)
    return 0


@command("serve-keys list")
def _keys_list(args) -> int:
    from ..serve import keys

    rows = keys.listing()
    if args.json:
        print_json({"keys": rows})
        return 0
    from rich.table import Table

    table = Table("id", "tenant", "created", "revoked")
    for r in rows:
        table.add_row(r["id"], r["tenant"], r["created"], r["revoked"] or "-")
    rich_console().print(table if rows else "no keys yet: `appliance serve keys create --tenant NAME`")
    return 0


@command("serve-keys revoke")
def _keys_revoke(args) -> int:
    from ..serve import keys

    gone = keys.revoke(args.which)
    if args.json:
        print_json({"revoked": gone})
    else:
        for r in gone:
            print(f"revoked {r['id']} (tenant {r['tenant']})")
    return 0


@command("serve-allow")
def _allow(args) -> int:
    from ..serve import allow_host, allowed_hosts

    if args.address is None:
        if args.remove:
            from ..errors import InvalidInput

            raise InvalidInput("--remove needs the ADDRESS to withdraw.")
        hosts = allowed_hosts()
    else:
        hosts = allow_host(args.address, remove=args.remove)
    if args.json:
        print_json({"listen": hosts})
    else:
        print("serve --host may listen on: " + (", ".join(hosts) if hosts else "loopback only"))
    return 0


@command("serve-status")
def _status(args) -> int:
    from ..serve import running

    servers = running()
    if args.json:
        print_json({"servers": servers})
        return 0
    if not servers:
        print("no server is running")
    for s in servers:
        served = s["usage"]["tenants"]
        print(f"{s['model']} at {s['url']} (pid {s['pid']}, since {s['started']}): "
              f"{sum(t['requests'] for t in served.values())} requests, {s['usage']['denied']} refused")
    return 0


@command("serve-cert")
def _cert(args) -> int:
    from ..serve.tls import make_pair

    made = make_pair(args.host, days=args.days, out=args.out)
    if args.json:
        print_json(made)
    else:
        print(f"certificate {made['cert']} and key {made['key']} for {made['host']} (until {made['expires']})")
        print(f"sha256 fingerprint: {made['sha256']}")
        print(f"serve with: appliance serve MODEL --host {made['host']} --tls-cert {made['cert']} --tls-key "
              f"{made['key']}; give clients the certificate file to pin (e.g. curl --cacert, httpx verify=)")
    return 0


@command("serve-limits")
def _limits(args) -> int:
    from ..serve import limits

    if args.tenant is None:
        table = limits.tenant_overrides()
    else:
        limits.set_tenant(args.tenant, max_tokens=args.max_tokens, concurrent=args.concurrent, reset=args.reset)
        table = limits.tenant_overrides()
    if args.json:
        print_json({"defaults": {k: getattr(Limits(), k) for k in limits.TENANT_FIELDS}, "tenants": table})
    else:
        if not table:
            print("every tenant has the server's limits (serve --max-tokens, --concurrent)")
        for tenant, own in sorted(table.items()):
            print(f"{tenant}: " + ", ".join(f"{k} {v}" for k, v in sorted(own.items())))
    return 0
