"""`appliance vault init|status|verify|rekey` and `appliance data import|package|list|show|export|rm`: the encrypted
store and its datasets."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import command, rich_console, print_json, unlocked


def parsers(add) -> None:
    v = add("vault", "the encrypted store: its keyring and passphrase", json_out=False)
    vsub = v.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    vi = vsub.add_parser("init", help="create the keyring (passphrase from $APPLIANCE_PASSPHRASE_FILE or a prompt)")
    vi.add_argument("--kdf", default="scrypt", choices=["scrypt", "pbkdf2-sha256", "argon2id"],
                    help="scrypt (default), pbkdf2-sha256 (FIPS-minded sites) or argon2id")
    vi.add_argument("--json", action="store_true")
    vs = vsub.add_parser("status", help="the keyring's KDF, parameters and datasets (no passphrase needed)")
    vs.add_argument("--json", action="store_true")
    vv = vsub.add_parser("verify", help="authenticate every file of every dataset and report any damage")
    vv.add_argument("--json", action="store_true")
    vr = vsub.add_parser("rekey", help="change the passphrase: rewraps every key, re-encrypts no data "
                                       "(new passphrase from $APPLIANCE_NEW_PASSPHRASE_FILE or a prompt)")
    vr.add_argument("--kdf", choices=["scrypt", "pbkdf2-sha256", "argon2id"], help="switch KDF while at it")
    vr.add_argument("--json", action="store_true")

    d2 = add("data", "datasets in the encrypted vault", json_out=False)
    dsub = d2.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    di = dsub.add_parser("import", help="import a JSONL, JSON or CSV file into the vault (validated, cleaned, split), "
                                        "or a dataset package from another machine")
    di.add_argument("file", help="the file, or a package folder (`data package`)")
    di.add_argument("--name", help="the dataset's id (a package keeps its own)")
    di.add_argument("--signer", metavar="FINGERPRINT|KEYFILE",
                    help="a package: the maker's signing-key fingerprint (or .pub file) it must be signed by "
                         "(without it, the fingerprint is shown and a yes asked for at the terminal)")
    di.add_argument("--format", default="auto", choices=["auto", "chat", "sharegpt", "alpaca", "completion", "dpo"])
    di.add_argument("--near-dup", type=float, default=0.9,
                    help="near-duplicate Jaccard threshold, 0.5 to 0.98 (default 0.9); 1.0 keeps near-duplicates")
    di.add_argument("--min-tokens", type=int, default=10, help="drop examples shorter than this (default 10)")
    di.add_argument("--split", default="80/10/10",
                    help="train/validation/test shares (default 80/10/10); test serves only the final evaluation")
    di.add_argument("--val-ratio", type=float, help="the older two-way split: this validation share, no test split")
    di.add_argument("--leakage", type=float, default=0.8,
                    help="held-out records this similar (Jaccard, 0.5 to 0.98; default 0.8) to a training record "
                         "move to train; 1.0 skips the check")
    di.add_argument("--seed", type=int, default=0, help="seed of the split")
    di.add_argument("--salvage", action="store_true", help="import the complete records of a file cut off mid-record")
    di.add_argument("--json", action="store_true")
    dp = dsub.add_parser("package", help="an encrypted dataset package for another machine: the ciphertext, the signed "
                                         "manifest sealed, and the data key wrapped under a package passphrase "
                                         "($APPLIANCE_PACKAGE_PASSPHRASE_FILE, a prompt, or --generate-passphrase)")
    dp.add_argument("--generate-passphrase", action="store_true",
                    help="make a strong package passphrase and print it once (give it to the other machine's "
                         "operator by another way than the package)")
    dp.add_argument("name")
    dp.add_argument("out", help="the package folder to write; it must not exist")
    dp.add_argument("--kdf", default="scrypt", choices=["scrypt", "pbkdf2-sha256", "argon2id"],
                    help="how the package passphrase becomes a key (default scrypt)")
    dp.add_argument("--json", action="store_true")
    dl = dsub.add_parser("list", help="datasets with their record counts (no passphrase needed)")
    dl.add_argument("--json", action="store_true")
    dsh = dsub.add_parser("show", help="decrypt a few records to the terminal")
    dsh.add_argument("name")
    dsh.add_argument("--split", default="train", choices=["train", "validation", "test"])
    dsh.add_argument("-n", type=int, default=5, help="how many records (default 5)")
    dsh.add_argument("--report", action="store_true", help="show the import report instead")
    dsh.add_argument("--json", action="store_true")
    de = dsub.add_parser("export", help="write a dataset's plaintext to a file you name")
    de.add_argument("name")
    de.add_argument("--out", required=True, help="the file to write (JSON Lines); it must not exist")
    de.add_argument("--split", default="all", choices=["all", "train", "validation", "test"])
    de.add_argument("--json", action="store_true")
    dr = dsub.add_parser("rm", help="crypto-shred a dataset (its key is destroyed, its files removed)")
    dr.add_argument("name")
    dr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dr.add_argument("--json", action="store_true")


@command("vault init")
def _vault_init(args) -> int:
    from ..errors import InvalidInput
    from ..trust import keyring, passphrase

    if keyring.exists():  # before asking for a passphrase that would not be used
        raise InvalidInput(f"a vault already exists at {keyring.path()}; `appliance vault rekey` changes its passphrase.")
    keyring.init(passphrase.read(confirm=True), kdf=args.kdf)
    st = keyring.status()
    print_json(st) if args.json else print(f"vault created at {st['path']} ({args.kdf})")
    return 0


@command("vault status")
def _vault_status(args) -> int:
    from ..trust import keyring

    st = keyring.status()
    if args.json:
        print_json(st)
    else:
        params = ", ".join(f"{k}={v}" for k, v in st["kdf"].items() if k != "name")
        lines = [f"keyring: {st['path']}", f"    kdf: {st['kdf']['name']} ({params})",
                 f"datasets: {len(st['datasets'])}" + (f": {', '.join(st['datasets'])}" if st["datasets"] else ""),
                 f" created: {st['created']}"]
        if st.get("rekeyed"):
            lines.append(f" rekeyed: {st['rekeyed']}")
        print("\n".join(lines))
    return 0


@command("vault verify")
def _vault_verify(args) -> int:
    from ..trust import store

    report = store.verify(unlocked())
    bad = [r for r in report if not r["ok"]]
    if args.json:
        print_json({"ok": not bad, "datasets": report})
    else:
        for r in report:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['dataset']}" + "".join(f"\n    {p}" for p in r["problems"]))
        print(f"{len(report)} datasets checked, {len(bad)} damaged" if report else "the keyring opens; no datasets yet")
    if bad:
        print(f"error: {len(bad)} of {len(report)} datasets are damaged: {', '.join(r['dataset'] for r in bad)}.",
              file=sys.stderr)
        return 3
    return 0


@command("vault rekey")
def _vault_rekey(args) -> int:
    from ..trust import keyring, passphrase

    old = passphrase.read(prompt="current passphrase: ")
    keyring.unlock(old)  # say "wrong passphrase" before asking for the new one
    new = passphrase.read(passphrase.NEW_ENV, prompt="new passphrase: ", confirm=True)
    keyring.rekey(old, new, kdf=args.kdf)
    st = keyring.status()
    print_json(st) if args.json else print(f"passphrase changed; {len(st['datasets'])} keys rewrapped, no data re-encrypted")
    return 0


@command("data import")
def _data_import(args) -> int:
    from ..errors import InvalidInput
    from ..importer import import_dataset, parse_split
    from ..render import import_report, reporter
    from ..trust import package

    if package.is_package(Path(args.file).expanduser()):
        return _package_import(args)
    if not args.name:
        raise InvalidInput(f"data import {args.file}: give the dataset's id with --name (a package folder keeps its "
                           "own).")

    split = None if args.val_ratio is not None else parse_split(args.split)
    report = import_dataset(unlocked(), args.file, args.name, fmt=args.format, near_dup=args.near_dup,
                            min_tokens=args.min_tokens, split=split, val_ratio=args.val_ratio, seed=args.seed,
                            salvage=args.salvage, leakage=args.leakage, emit=reporter(args.json))
    if args.json:
        print_json(report)
    else:
        rich_console().print(import_report(report))
    return 0


def _package_import(args) -> int:
    from .. import hardware
    from ..render import split_counts
    from ..trust import package, passphrase

    vault = unlocked()  # the vault's passphrase first, then the package's
    signer = args.signer or _confirm_signer(package.inspect(Path(args.file)))
    result = package.open_package(
        vault, Path(args.file), lambda: passphrase.read(package.PASSPHRASE_ENV, prompt="package passphrase: "),
        hardware=hardware.summary(), signer=signer, name=args.name)
    if args.json:
        print_json(result)
    else:
        print(f"imported package {args.file} as dataset {result['dataset']} ({split_counts(result['records'])}), "
              f"signed by {result['signer']}")
    return 0


def _confirm_signer(seen: dict) -> str | None:
    """At a terminal: show the signer's fingerprint and ask; elsewhere None (open_package then asks for
    --signer in one sentence)."""
    if not sys.stdin.isatty():
        return None
    print(f"{seen['package']} is signed by the key\n  {seen['signer']}\ncompare it with the fingerprint the maker's "
          "`appliance data package` printed.", file=sys.stderr)
    if input("is this the maker's key? [y/N] ").strip().lower() not in ("y", "yes"):
        from ..errors import InvalidInput

        raise InvalidInput("not imported: the signer was not confirmed.")
    return seen["signer"]


@command("data package")
def _data_package(args) -> int:
    from ..render import split_counts
    from ..trust import package, passphrase

    vault = unlocked()
    if args.generate_passphrase:
        secret = package.generate_passphrase()
    else:
        secret = passphrase.read(package.PASSPHRASE_ENV, prompt="package passphrase (for the other machine): ",
                                 confirm=True)
    made = package.make(vault, args.name, Path(args.out), secret, kdf=args.kdf)
    if args.generate_passphrase:
        made["passphrase"] = secret  # shown this once; kept nowhere
    if args.json:
        print_json(made)
    else:
        if args.generate_passphrase:
            print(f"package passphrase (shown once; give it to the other machine's operator apart from the package): "
                  f"{secret}")
        print(f"packaged {args.name} ({split_counts(made['records'])}) into {made['out']}: ciphertext only, the key "
              f"wrapped under the package passphrase ({made['kdf']}); signed by {made['signer']}. On the other machine: "
              f"`appliance data import {made['out']} --signer {made['signer']}`")
    return 0


@command("data list")
def _data_list(args) -> int:
    from ..trust import manifest
    from ..workspace import folder

    rows = []
    for p in sorted(folder("datasets").iterdir()):
        if (p / manifest.NAME).is_file():
            d = manifest.read(p)["details"]
            rows.append({"id": p.name, "encrypted": d.get("format") == "appliance-dataset/1",
                         "records": d.get("records"), "format": d.get("format"), "source": d.get("source")})
        elif (p / "train.jsonl").is_file():
            rows.append({"id": p.name, "encrypted": False, "records": None, "format": "plain jsonl", "source": None})
    if args.json:
        print_json({"datasets": rows})
        return 0
    from rich.table import Table

    table = Table("id", "encrypted", "train", "validation", "test", "source")
    for r in rows:
        rec = r["records"] or {}
        table.add_row(r["id"], "yes" if r["encrypted"] else "[red]no[/]", str(rec.get("train", "-")),
                      str(rec.get("validation", "-")), str(rec.get("test", "-")), str(r["source"] or "-"))
    rich_console().print(table if rows else "no datasets yet: `appliance data import FILE --name NAME`")
    return 0


@command("data show")
def _data_show(args) -> int:
    from ..data import show

    if args.report:
        report = show(args.name, "report", 1)[0]
        if args.json:
            print_json(report)
        else:
            from ..render import import_report

            rich_console().print(import_report(report))
        return 0
    records = show(args.name, args.split, args.n)
    if args.json:
        print_json({"dataset": args.name, "split": args.split, "records": records})
        return 0
    for i, r in enumerate(records):
        print(f"--- {args.name} {args.split} #{i}")
        for m in r.get("messages", []):
            print(f"[{m['role']}] {m['content']}")
        if "chosen" in r:
            for m in r["prompt"]:
                print(f"[{m['role']}] {m['content']}")
            print(f"[chosen] {r['chosen']}\n[rejected] {r['rejected']}")
    return 0


@command("data export")
def _data_export(args) -> int:
    from ..data import export_plain

    out = Path(args.out).expanduser()
    n = export_plain(args.name, None if args.split == "all" else [args.split], out)
    print_json({"dataset": args.name, "out": str(out), "records": n}) if args.json else print(
        f"wrote {n} records of {args.name} in plaintext to {out}")
    return 0


@command("data rm")
def _data_rm(args) -> int:
    from ..errors import InvalidInput
    from ..trust import store

    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"removing {args.name!r} destroys it for good; confirm with --yes.")
        if input(f"crypto-shred dataset {args.name!r}? its key is destroyed and cannot be recovered [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    store.remove(unlocked(), args.name)
    print_json({"dataset": args.name, "removed": True}) if args.json else print(
        f"{args.name}: key destroyed, files removed")
    return 0
