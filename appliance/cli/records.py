"""`appliance audit log|verify|report`, `appliance verify` and `appliance bundle [verify]`: the record and the lineage."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import command, rich_console, print_json


def parsers(add) -> None:
    au = add("audit", "the tamper-evident audit log", json_out=False)
    asub = au.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    al = asub.add_parser("log", help="entries of the audit log, oldest first")
    al.add_argument("--since", help="an ISO time (2026-11-22, 2026-11-22T10:00) or a span back from now (30m, 12h, 7d)")
    al.add_argument("--event", help="an event name or prefix, e.g. dataset or dataset.export")
    al.add_argument("--json", action="store_true")
    av = asub.add_parser("verify", help="check the hash chain and the signed checkpoints; names the first bad entry")
    av.add_argument("--pubkey", help="a trusted copy of the appliance's signing-key.pub (default: the keyring's)")
    av.add_argument("--json", action="store_true")
    ar = asub.add_parser("report", help="a human-readable report of a period (Markdown or HTML)")
    ar.add_argument("--since")
    ar.add_argument("--until")
    ar.add_argument("--format", default="md", choices=["md", "html"])
    ar.add_argument("--out", help="write the report to this file (default: print it)")

    b = add("bundle", "write a signed edge bundle of a run's GGUF (`bundle RUN --out DIR`), "
                      "or check one anywhere (`bundle verify DIR`)")
    b.add_argument("run", help="a run id, or `verify`")
    b.add_argument("dir", nargs="?", help="with `verify`: the bundle folder")
    b.add_argument("--out", help="the folder to create for the bundle")
    from .artifacts import checkpoint_flag

    checkpoint_flag(b)
    b.add_argument("--quant", default="q4_k_m",
                   help="which exported GGUF to ship (default q4_k_m); auto: the closest to f16 that fits --max-size")
    b.add_argument("--max-size", help="with --quant auto: the largest model file the edge box takes, e.g. 2GB")
    b.add_argument("--adapter", action="store_true",
                   help="also carry the run's GGUF adapter (`export RUN --adapter`), to serve on its base at the edge")
    b.add_argument("--pubkey", help="with `verify`: the trusted signing-key.pub of the appliance that made it")
    b.add_argument("--fingerprint", help="with `verify`: the trusted key's sha256 fingerprint (64 hex digits)")

    vf = add("verify", "check an artifact's signed manifest and walk its lineage back through the workspace")
    vf.add_argument("path", help="an artifact folder (dataset, model, run, adapter, merged, gguf, bundle) or a file in one")
    vf.add_argument("--pubkey", help="a trusted copy of the appliance's signing-key.pub (default: the keyring's)")


@command("audit log")
def _audit_log(args) -> int:
    from ..trust import audit

    found = audit.entries(since=args.since, event=args.event)
    if args.json:
        print_json({"entries": found})
        return 0
    from rich.table import Table

    table = Table("seq", "time (UTC)", "user", "event", "subjects", "details")
    for e in found:
        table.add_row(str(e["seq"]), e["time"][:19].replace("T", " "), e["user"], e["event"],
                      " ".join(f"{k}={v}" for k, v in e["subjects"].items()),
                      " ".join(f"{k}={v}" for k, v in e["details"].items())[:80])
    rich_console().print(table if found else "no audit entries match")
    return 0


@command("audit verify")
def _audit_verify(args) -> int:
    from ..trust import audit, signing

    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = audit.verify(public)
    if args.json:
        print_json({"ok": True, **result})
    else:
        print(f"audit log intact: {result['entries']} entries, head {result['head'][:16]}..., signed through entry "
              f"{result['signed_through']} ({result['checkpoints']} checkpoints, key {str(result['key'])[:16]}...)")
        if result["unsigned_tail"]:
            print(f"note: the last {result['unsigned_tail']} entries come after the last signed checkpoint; "
                  "the next command that unlocks the vault signs them.")
        if result["torn_tail_bytes"]:
            print(f"note: {result['torn_tail_bytes']} bytes of a torn last entry (a crash mid-append) follow the last "
                  "whole entry; the next append cuts them off and records it.")
    return 0


@command("audit report")
def _audit_report(args) -> int:
    from ..trust import audit

    if args.out:
        print(f"wrote {audit.write_report(Path(args.out), since=args.since, until=args.until, fmt=args.format)}")
    else:
        print(audit.report(since=args.since, until=args.until, fmt=args.format))
    return 0


@command("verify")
def _verify(args) -> int:
    from ..trust import provenance, signing

    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = provenance.verify(Path(args.path), public)
    if args.json:
        print_json(result)
    else:
        marks = {"ok": "ok    ", "bad": "BAD   ", "absent": "absent"}
        for item in result["lineage"]:
            label = f"{item['role']}: {item['kind'] or ''} {item['id'] or ''}".strip()
            print(f"{marks[item['status']]} {label}" + (f"\n       {item['problem']}" if item["problem"] else ""))
        print(f"signed by {result['key'][:16]}...")
    if not result["ok"]:
        bad = next(i for i in result["lineage"] if i["status"] == "bad")
        print(f"error: {bad['problem']}", file=sys.stderr)
        return 3
    return 0


@command("bundle")
def _bundle(args) -> int:
    from .. import bundle
    from ..errors import InvalidInput

    if args.run == "verify":
        if not args.dir:
            raise InvalidInput("name the bundle folder: `appliance bundle verify DIR`.")
        return _bundle_verify(args)
    if not args.out:
        raise InvalidInput(f"name a new folder for the bundle: `appliance bundle {args.run} --out DIR`.")
    from ..render import reporter

    from ..evaluate.quants import parse_size

    max_size = parse_size(args.max_size) if args.max_size else None
    result = bundle.create(args.run, Path(args.out), quant=args.quant, emit=reporter(args.json),
                           checkpoint=args.checkpoint, max_size=max_size, adapter=args.adapter)
    if result.get("chosen_because") and not args.json:
        print(f"--quant auto chose {result['chosen_because']}")
    print_json(result) if args.json else print(
        f"bundle written to {result['path']} ({result['model']}, {result['bytes'] / 2**20:.0f} MiB), "
        f"signed by {result['key'][:16]}...\non the edge box: appliance bundle verify DIR --fingerprint {result['key']}")
    return 0


def _bundle_verify(args) -> int:
    from .. import bundle
    from ..errors import InvalidInput
    from ..trust import signing

    if args.fingerprint and args.pubkey:
        raise InvalidInput("give --pubkey or --fingerprint, not both.")
    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = bundle.verify_bundle(Path(args.dir), public, fingerprint=args.fingerprint)
    if args.json:
        print_json(result)
        return 0
    for item in result["lineage"]:
        print(f"{'ok    ' if item['status'] == 'ok' else 'absent'} {item['kind']} {item['id']}")
    print(f"bundle intact: {result['model']}, signed by {result['key']}")
    if not result["trusted_key"]:
        print("warning: checked against the key inside the bundle; pass --fingerprint or --pubkey with the appliance's "
              "key, obtained out of band, to prove where it came from.", file=sys.stderr)
    return 0
