"""`appliance serve`: the OpenAI-compatible endpoint, its keys and where it may listen.

``serve keys ...``, ``serve allow ...`` and ``serve status`` are groups of their own under ``serve`` (``main``
routes ``serve keys`` to the hidden ``serve-keys`` parser), since ``serve MODEL`` takes any model name.
"""

from __future__ import annotations

import sys

from .common import command, print_json, rich_console

GROUPS = ("keys", "allow", "status")


def parsers(add) -> None:
    s = add("serve", "an OpenAI-compatible endpoint on loopback for a run, a model or a .gguf "
                     "(also: serve keys create|list|revoke, serve allow ADDRESS, serve status)")
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


def rewrite(argv: list[str]) -> list[str]:
    """``serve keys create ...`` -> ``serve-keys create ...`` (and allow, status)."""
    if len(argv) >= 2 and argv[0] == "serve" and argv[1] in GROUPS:
        return [f"serve-{argv[1]}", *argv[2:]]
    return argv


@command("serve")
def _serve(args) -> int:
    from ..serve import Server

    server = Server(args.model, port=args.port, host=args.host, parallel=args.parallel, ctx=args.ctx,
                    threads=args.threads, adapters=args.adapter)

    def ready(s) -> None:
        if args.json:
            print_json({"ready": True, **s.state()})
        else:
            tenants = ", ".join(s.plan.tenants) if s.plan.tenants else "every tenant with a key"
            print(f"serving {s.plan.name} at {s.url} (llama-server, {s.parallel} slots; {tenants}); Ctrl-C stops")
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
