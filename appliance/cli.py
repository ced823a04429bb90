"""The ``appliance`` command: a thin shell over the library.

Every command that reports takes ``--json`` and prints one JSON object. A user
mistake (an ApplianceError) becomes one sentence on stderr and a non-zero exit,
never a traceback. Heavy libraries load inside the commands that need them, so
``appliance --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ApplianceError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Offline fine-tuning appliance: import, train, merge, export, ask.")
    p.add_argument("--version", action="version", version=f"appliance {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def add(name: str, help: str, json_out: bool = True, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, **kw)
        if json_out:
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        return sp

    d = add("demo", "the whole pipeline on the embedded default model and the demo dataset")
    d.add_argument("--base", help="a .gguf file to use instead of the embedded SmolLM2-135M-Instruct")
    d.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    d.add_argument("--eval-samples", type=int, default=48, help="held-out examples scored for base vs tuned")

    doc = add("doctor", "environment, air-gap and hardware self-check: egress guard, offline switches, interfaces, "
                        "routes, CPU, RAM, GPUs")
    doc.add_argument("--simulate", metavar="PROFILE", help="report the hardware of a named profile (see `appliance hw "
                                                           "--list-profiles`) instead of this machine's")

    from .hardware import PROFILES

    hw = add("hw", "detected hardware: CPU, cores, RAM, free disk, NVIDIA GPUs (NVML: VRAM, compute capability, "
                   "driver, CUDA, temperature, power, PCIe, NVLink/P2P), bf16 and bitsandbytes")
    hw.add_argument("--simulate", metavar="PROFILE",
                    help=f"a named profile instead of this machine: {', '.join(PROFILES)}")
    hw.add_argument("--list-profiles", action="store_true", help="list the profiles --simulate accepts")

    m = add("models", "imported base models", json_out=False)
    msub = m.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    mi = msub.add_parser("import", help="import a .gguf file or a Hugging Face folder (safetensors only)")
    mi.add_argument("path")
    mi.add_argument("--name", help="model id (default: from the file)")
    mi.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="precision of the imported weights (GGUF is dequantized to it)")
    mi.add_argument("--json", action="store_true")
    ml = msub.add_parser("list", help="list imported models")
    ml.add_argument("--json", action="store_true")

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
    di = dsub.add_parser("import", help="import a JSONL, JSON or CSV file into the vault (validated, cleaned, split)")
    di.add_argument("file")
    di.add_argument("--name", required=True, help="the dataset's id")
    di.add_argument("--format", default="auto", choices=["auto", "chat", "sharegpt", "alpaca", "completion", "dpo"])
    di.add_argument("--near-dup", type=float, default=0.9,
                    help="near-duplicate Jaccard threshold, 0.5 to 0.98 (default 0.9); 1.0 keeps near-duplicates")
    di.add_argument("--min-tokens", type=int, default=10, help="drop examples shorter than this (default 10)")
    di.add_argument("--val-ratio", type=float, default=0.1, help="held-out share (default 0.1, i.e. 9:1)")
    di.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    di.add_argument("--salvage", action="store_true", help="import the complete records of a file cut off mid-record")
    di.add_argument("--json", action="store_true")
    dl = dsub.add_parser("list", help="datasets with their record counts (no passphrase needed)")
    dl.add_argument("--json", action="store_true")
    dsh = dsub.add_parser("show", help="decrypt a few records to the terminal")
    dsh.add_argument("name")
    dsh.add_argument("--split", default="train", choices=["train", "validation"])
    dsh.add_argument("-n", type=int, default=5, help="how many records (default 5)")
    dsh.add_argument("--report", action="store_true", help="show the import report instead")
    dsh.add_argument("--json", action="store_true")
    de = dsub.add_parser("export", help="write a dataset's plaintext to a file you name")
    de.add_argument("name")
    de.add_argument("--out", required=True, help="the file to write (JSON Lines); it must not exist")
    de.add_argument("--split", default="all", choices=["all", "train", "validation"])
    de.add_argument("--json", action="store_true")
    dr = dsub.add_parser("rm", help="crypto-shred a dataset (its key is destroyed, its files removed)")
    dr.add_argument("name")
    dr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dr.add_argument("--json", action="store_true")

    pl = add("plan", "will a recipe fit this machine's GPUs (or RAM)? memory per device, adjustments, strategy")
    pl.add_argument("recipe")
    pl.add_argument("--simulate", metavar="PROFILE", help="plan for a named hardware profile (`appliance hw --help`)")
    pl.add_argument("--model-config", help="the base model's config.json, to plan before its weights are here")
    pl.add_argument("--limit", type=float, default=0.9, help="share of each device's memory a plan may use (0.9)")
    pl.add_argument("--allow-shorter", action="store_true", help="allow shorter sequences if nothing else fits")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")

    t = add("train", "start a training run from a recipe; prints the run id")
    t.add_argument("recipe")
    t.add_argument("--allow-shorter", action="store_true",
                   help="let the plan shorten sequences if nothing else makes the run fit")
    t.add_argument("--processes", type=int, metavar="N",
                   help="data-parallel processes (default: the plan's choice; one per GPU when a replica fits one)")
    t.add_argument("--detach", action="store_true", help="start the run and return at once")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set training.max_steps=10")

    r = add("runs", "training runs", json_out=False)
    rsub = r.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    for name, help in (("list", "list runs"), ("show", "one run in detail"), ("follow", "follow a run's progress"),
                       ("stop", "stop a running run (it stays resumable)"),
                       ("resume", "continue an interrupted run from its last checkpoint")):
        sp = rsub.add_parser(name, help=help)
        if name != "list":
            sp.add_argument("run")
        if name == "resume":
            sp.add_argument("--detach", action="store_true")
            sp.add_argument("--processes", type=int, metavar="N", help="data-parallel processes (default: as before)")
        sp.add_argument("--json", action="store_true")

    g = add("merge", "merge a run's adapter into its 16-bit base model")
    g.add_argument("run")

    x = add("export", "export a run's merged model to GGUF and check it against the merged model")
    x.add_argument("run")
    x.add_argument("--quant", default=None, help="comma-separated: f16,q8_0,q4_k_m (default: the recipe's)")

    e = add("eval", "score base vs tuned on the held-out split")
    e.add_argument("run")
    e.add_argument("--samples", type=int, default=48)

    a = add("ask", "one answer from a model (run id, model id or .gguf path)")
    a.add_argument("model")
    a.add_argument("--prompt", required=True)
    a.add_argument("--system")
    a.add_argument("--max-tokens", type=int, default=256)
    a.add_argument("--temperature", type=float, default=0.0)
    _sampling_flags(a, seed=0)
    a.add_argument("--threads", type=int)

    c = add("chat", "interactive chat with a model (run id, model id or .gguf path)", json_out=False)
    c.add_argument("model")
    c.add_argument("--system")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    _sampling_flags(c, seed=None)

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
    b.add_argument("--quant", default="q4_k_m", help="which exported GGUF to ship (default q4_k_m)")
    b.add_argument("--pubkey", help="with `verify`: the trusted signing-key.pub of the appliance that made it")
    b.add_argument("--fingerprint", help="with `verify`: the trusted key's sha256 fingerprint (64 hex digits)")

    vf = add("verify", "check an artifact's signed manifest and walk its lineage back through the workspace")
    vf.add_argument("path", help="an artifact folder (dataset, model, run, adapter, merged, gguf, bundle) or a file in one")
    vf.add_argument("--pubkey", help="a trusted copy of the appliance's signing-key.pub (default: the keyring's)")

    tu = add("tui", "the terminal UI (also what `appliance` with no command opens in a terminal)", json_out=False)
    tu.add_argument("--simulate", metavar="PROFILE", help="show a named hardware profile instead of this machine's")
    return p


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # the `appliance` command itself, not a caller passing arguments in-process
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):  # a pipe or a script: the help, as always
            parser.print_help()
            return 0
        args = parser.parse_args(["tui"])
    key = args.cmd if getattr(args, "sub", None) is None else f"{args.cmd} {args.sub}"
    if from_shell and args.cmd in NATIVE:
        from . import native_crash

        return native_crash.supervise(key, lambda: dispatch(key, args))
    return dispatch(key, args)


# The commands that run llama.cpp in this process: run from a shell, they run in a child that a parent watches,
# so a native crash (an illegal instruction, a segfault) is reported with the step that died (native_crash.py).
NATIVE = frozenset({"ask", "chat", "export", "eval", "demo", "tui", "bundle"})


def dispatch(key: str, args: argparse.Namespace) -> int:
    quiet_libraries()
    try:
        return COMMANDS[key](args)
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user mistake: say so briefly, keep the details one switch away
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (run again with APPLIANCE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 70


def quiet_libraries() -> None:
    """Keep the libraries' own chatter (progress bars, advisory warnings) off the user's terminal."""
    import logging

    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes warns on every import that it could not fetch an optional CPU kernel from a hub;
    # on an offline appliance that is expected, not news.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers", "peft", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- output helpers ---------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _version() -> str:
    from . import __version__

    return __version__


# -- commands ----------------------------------------------------------------

@command("models import")
def _models_import(args) -> int:
    from .models import import_model
    from .render import reporter

    m = import_model(args.path, name=args.name, dtype=args.dtype, emit=reporter(args.json))
    if args.json:
        _print_json(m)
    else:
        print(f"imported {m['id']} ({m['details'].get('architecture')}, {len(m['files'])} files)")
    return 0


@command("models list")
def _models_list(args) -> int:
    from .models import list_models

    ms = list_models()
    if args.json:
        _print_json({"models": ms})
        return 0
    from rich.table import Table

    table = Table("id", "architecture", "params", "dtype", "source")
    for m in ms:
        d = m["details"]
        params = f"{d['parameters'] / 1e6:.0f}M" if d.get("parameters") else "-"
        table.add_row(m["id"], str(d.get("architecture")), params, str(d.get("dtype", "-")),
                      d.get("source", {}).get("format", "-"))
    _console().print(table if ms else "no models yet: `appliance models import PATH`")
    return 0


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    from .errors import InvalidInput

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInput(f"--set {pair!r} needs the form KEY=VALUE, e.g. --set training.max_steps=10.")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


@command("vault init")
def _vault_init(args) -> int:
    from .errors import InvalidInput
    from .vault import keyring, passphrase

    if keyring.exists():  # before asking for a passphrase that would not be used
        raise InvalidInput(f"a vault already exists at {keyring.path()}; `appliance vault rekey` changes its passphrase.")
    keyring.init(passphrase.read(confirm=True), kdf=args.kdf)
    st = keyring.status()
    _print_json(st) if args.json else print(f"vault created at {st['path']} ({args.kdf})")
    return 0


@command("vault status")
def _vault_status(args) -> int:
    from .vault import keyring

    st = keyring.status()
    if args.json:
        _print_json(st)
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
    from .vault import store

    report = store.verify(_unlocked())
    bad = [r for r in report if not r["ok"]]
    if args.json:
        _print_json({"ok": not bad, "datasets": report})
    else:
        for r in report:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['dataset']}" + "".join(f"\n    {p}" for p in r["problems"]))
        print(f"{len(report)} datasets checked, {len(bad)} damaged" if report else "the keyring opens; no datasets yet")
    if bad:
        print(f"error: {len(bad)} of {len(report)} datasets are damaged: {', '.join(r['dataset'] for r in bad)}.",
              file=sys.stderr)
        return 3
    return 0


def _unlocked():
    from .data import vault

    return vault()


@command("data import")
def _data_import(args) -> int:
    from .importer import import_dataset
    from .render import import_report, reporter

    report = import_dataset(_unlocked(), args.file, args.name, fmt=args.format, near_dup=args.near_dup,
                            min_tokens=args.min_tokens, val_ratio=args.val_ratio, seed=args.seed,
                            salvage=args.salvage, emit=reporter(args.json))
    if args.json:
        _print_json(report)
    else:
        _console().print(import_report(report))
    return 0


@command("data list")
def _data_list(args) -> int:
    from . import manifest
    from .workspace import folder

    rows = []
    for p in sorted(folder("datasets").iterdir()):
        if (p / manifest.NAME).is_file():
            d = manifest.read(p)["details"]
            rows.append({"id": p.name, "encrypted": d.get("format") == "appliance-dataset/1",
                         "records": d.get("records"), "format": d.get("format"), "source": d.get("source")})
        elif (p / "train.jsonl").is_file():
            rows.append({"id": p.name, "encrypted": False, "records": None, "format": "plain jsonl", "source": None})
    if args.json:
        _print_json({"datasets": rows})
        return 0
    from rich.table import Table

    table = Table("id", "encrypted", "train", "validation", "source")
    for r in rows:
        rec = r["records"] or {}
        table.add_row(r["id"], "yes" if r["encrypted"] else "[red]no[/]", str(rec.get("train", "-")),
                      str(rec.get("validation", "-")), str(r["source"] or "-"))
    _console().print(table if rows else "no datasets yet: `appliance data import FILE --name NAME`")
    return 0


@command("data show")
def _data_show(args) -> int:
    from .data import show

    if args.report:
        report = show(args.name, "report", 1)[0]
        if args.json:
            _print_json(report)
        else:
            from .render import import_report

            _console().print(import_report(report))
        return 0
    records = show(args.name, args.split, args.n)
    if args.json:
        _print_json({"dataset": args.name, "split": args.split, "records": records})
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
    from .data import export_plain

    out = Path(args.out).expanduser()
    n = export_plain(args.name, ["train", "validation"] if args.split == "all" else [args.split], out)
    _print_json({"dataset": args.name, "out": str(out), "records": n}) if args.json else print(
        f"wrote {n} records of {args.name} in plaintext to {out}")
    return 0


@command("data rm")
def _data_rm(args) -> int:
    from .errors import InvalidInput
    from .vault import store

    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"removing {args.name!r} destroys it for good; confirm with --yes.")
        if input(f"crypto-shred dataset {args.name!r}? its key is destroyed and cannot be recovered [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    store.remove(_unlocked(), args.name)
    _print_json({"dataset": args.name, "removed": True}) if args.json else print(
        f"{args.name}: key destroyed, files removed")
    return 0


@command("vault rekey")
def _vault_rekey(args) -> int:
    from .vault import keyring, passphrase

    old = passphrase.read(prompt="current passphrase: ")
    keyring.unlock(old)  # say "wrong passphrase" before asking for the new one
    new = passphrase.read(passphrase.NEW_ENV, prompt="new passphrase: ", confirm=True)
    keyring.rekey(old, new, kdf=args.kdf)
    st = keyring.status()
    _print_json(st) if args.json else print(f"passphrase changed; {len(st['datasets'])} keys rewrapped, no data re-encrypted")
    return 0


@command("train")
def _train(args) -> int:
    from . import plan as planner
    from . import recipes, runs
    from .errors import InvalidInput

    if args.processes is not None and args.processes < 1:
        raise InvalidInput(f"--processes {args.processes}: give 1 or more.")
    recipe = recipes.load(args.recipe, **_parse_overrides(args.set))
    # Plan first: refuse what cannot fit, apply the safe adjustments (the effective batch is kept).
    recipe, plan = planner.fitted(recipe, allow_shorter=args.allow_shorter)
    if plan["recipe_changes"] and not args.json:
        print("the plan adjusted the recipe to fit: " + "; ".join(a["change"] for a in plan["adjustments"]))
    run_id = runs.create(recipe, plan)
    runs.start(run_id, processes=args.processes)
    return _after_start(run_id, args.detach, args.json)


@command("plan")
def _plan(args) -> int:
    from . import plan as planner
    from . import recipes

    recipe = recipes.load(args.recipe, **_parse_overrides(args.set))
    plan = planner.plan_recipe(recipe, simulate=args.simulate, model_config=args.model_config, limit=args.limit,
                               allow_shorter=args.allow_shorter)
    if args.json:
        _print_json(plan)
    else:
        print(planner.render_text(plan))
    return 0 if plan["verdict"] != "does_not_fit" else 3


def _after_start(run_id: str, detach: bool, json_mode: bool) -> int:
    if detach:
        _print_json({"run": run_id, "state": "running"}) if json_mode else print(run_id)
        return 0
    if not json_mode:
        print(f"run {run_id}")
    return _follow(run_id, json_mode)


def _follow(run_id: str, json_mode: bool) -> int:
    from . import runs
    from .render import follow_training

    follow_training(runs.follow(run_id), quiet=json_mode)
    st = runs.status(run_id)
    if json_mode:
        _print_json(st)
    elif st["state"] == "finished":
        s = st["summary"] or {}
        print(f"finished: {s.get('steps')} steps, final loss {s.get('final_loss')}, adapter in {st['path']}/adapter")
    elif st["state"] == "failed":
        print(f"error: run {run_id} failed: {st['error']}", file=sys.stderr)
    elif st["state"] == "interrupted":
        print(f"run {run_id} stopped at step {st['step']}; `appliance runs resume {run_id}` continues "
              f"from {st['last_checkpoint'] or 'the start'}", file=sys.stderr)
    return {"finished": 0, "running": 0}.get(st["state"], 4)


@command("runs list")
def _runs_list(args) -> int:
    from . import runs

    rs = runs.list_runs()
    if args.json:
        _print_json({"runs": rs})
        return 0
    from rich.table import Table

    table = Table("state", "step", "loss", "base model")
    table.add_column("id", no_wrap=True)
    for r in rs:
        step = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        table.add_row(r["state"], step, loss, r["base_model"], r["id"])
    _console().print(table if rs else "no runs yet: `appliance train RECIPE`")
    return 0


@command("runs show")
def _runs_show(args) -> int:
    from . import runs

    st = runs.status(args.run)
    st.update({name: report for name, report in runs.reports(args.run).items() if report is not None})
    if args.json:
        _print_json(st)
        return 0
    for key in ("id", "state", "recipe", "base_model", "dataset", "step", "max_steps", "loss", "last_checkpoint",
                "error", "path"):
        if st.get(key) is not None:
            print(f"{key:>16}: {st[key]}")
    for key in ("summary", "merge", "export", "eval"):
        if st.get(key):
            print(f"{key:>16}: {json.dumps(st[key], sort_keys=True)}")
    return 0


@command("runs follow")
def _runs_follow(args) -> int:
    return _follow(args.run, args.json)


@command("runs stop")
def _runs_stop(args) -> int:
    from . import runs

    stopped = runs.stop(args.run)
    _print_json({"run": args.run, "stopped": stopped}) if args.json else print(
        f"stopping {args.run}" if stopped else f"run {args.run} is not running")
    return 0


@command("runs resume")
def _runs_resume(args) -> int:
    from . import runs

    runs.resume(args.run, processes=args.processes)
    return _after_start(args.run, args.detach, args.json)


@command("merge")
def _merge(args) -> int:
    from .merge import merge
    from .render import reporter

    result = merge(args.run, emit=reporter(args.json))
    if args.json:
        _print_json(result)
    else:
        print(f"merged into {result['path']} (max |logit difference| vs base+adapter: {result['max_abs_logit_diff']:.2e})")
    return 0


@command("export")
def _export(args) -> int:
    from .export import export
    from .render import reporter

    quants = [q.strip() for q in args.quant.split(",")] if args.quant else None
    result = export(args.run, quants, emit=reporter(args.json))
    if args.json:
        _print_json(result)
        return 0
    for q, f in result["files"].items():
        print(f"{q:>8}: {f['path']} ({f['bytes'] / 2**20:.1f} MiB)")
    p = result["parity"]
    print(f"  checks: template tokens identical on {p['template_conversations']} conversations; "
          f"stops at {p['eot_token']!r}; top-1 agreement {p['top1_agreement']:.2%} over {p['positions']} positions")
    return 0


@command("eval")
def _eval(args) -> int:
    from .evaluate import evaluate
    from .render import eval_table, reporter

    report = evaluate(args.run, samples=args.samples, emit=reporter(args.json))
    if args.json:
        _print_json(report)
    else:
        _console().print(eval_table(report))
    return 0


def _sampling_flags(p, seed: int | None) -> None:
    """ask's and chat's sampling knobs beyond the temperature (defaults: what they always used)."""
    from .infer import MIN_P, REPEAT_PENALTY, TOP_K, TOP_P

    p.add_argument("--top-p", type=float, default=TOP_P, help=f"nucleus sampling (default {TOP_P})")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"keep the k likeliest tokens; 0 keeps all (default {TOP_K})")
    p.add_argument("--min-p", type=float, default=MIN_P, help=f"drop tokens below this share of the likeliest (default {MIN_P})")
    p.add_argument("--repeat-penalty", type=float, default=REPEAT_PENALTY, help=f"1 is none (default {REPEAT_PENALTY})")
    p.add_argument("--seed", type=int, default=seed,
                   help="the sampling seed (default 0)" if seed is not None else
                   "the sampling seed of every turn (default: the turn's position, different each turn)")


def _sampling(args) -> dict:
    return {"top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed}


@command("ask")
def _ask(args) -> int:
    from .infer import ask

    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = ask(args.model, args.prompt, system=args.system, max_tokens=args.max_tokens,
                 temperature=args.temperature, threads=args.threads, on_text=stream, **_sampling(args))
    if args.json:
        _print_json(result)
    else:
        print()
    return 0


@command("chat")
def _chat(args) -> int:
    from .infer import Chat

    with Chat(args.model, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
              **_sampling(args)) as chat:
        print(f"chatting with {chat.model_path.name} (template from the GGUF); an empty line or Ctrl-D ends")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            if not line.strip():
                break
            sys.stdout.write("model> ")
            chat.say(line, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            print()
    return 0


@command("doctor")
def _doctor(args) -> int:
    from . import airgap
    from .errors import CheckFailed

    # A list of (section, checks); more sections (hardware) are appended here. A check's status is ok, warn, fail or
    # info; only a fail (the guard, its self-test, an offline switch) fails the command: an interface that is up or a
    # default route is a warning (CI machines have a network).
    from . import hardware

    hw = hardware.detect(getattr(args, "simulate", None))  # an unknown profile stops here, before any check runs
    sections = airgap.doctor_sections()
    sections.append(("hardware", hardware.doctor_checks(hw)))
    from . import llama_runtime

    sections.append(("llama.cpp", llama_runtime.doctor_checks()))
    failed = [f"{name}: {c['label']}" for name, checks in sections for c in checks if c["status"] == "fail"]
    warned = [f"{name}: {c['label']}" for name, checks in sections for c in checks if c["status"] == "warn"]
    if args.json:
        _print_json({"ok": not failed, "failures": failed, "warnings": warned,
                     "sections": {name: {c["id"]: c for c in checks} for name, checks in sections}})
    else:
        from rich.markup import escape
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red bold]FAIL[/]", "info": ""}
        console = _console()
        for name, checks in sections:
            table = Table(title=name, title_justify="left", show_header=False, box=None, padding=(0, 1))
            table.add_column(no_wrap=True)
            table.add_column(no_wrap=True)
            table.add_column(overflow="fold")
            for c in checks:
                value = ", ".join(map(str, c["value"])) if isinstance(c["value"], list) else str(c["value"])
                detail = f"\n[dim]{escape(c['detail'])}[/]" if c["detail"] else ""
                table.add_row(marks[c["status"]], c["label"], escape(value) + detail)
            console.print(table)
            console.print()
        console.print(f"{len(failed)} failed, {len(warned)} warnings" if failed or warned else "all checks passed")
    if failed:
        raise CheckFailed(f"appliance doctor: {len(failed)} check(s) failed: {'; '.join(failed)}.")
    return 0


@command("hw")
def _hw(args) -> int:
    from . import hardware

    if args.list_profiles:
        if args.json:
            _print_json({"profiles": hardware.PROFILES})
        else:
            width = max(map(len, hardware.PROFILES))
            print("\n".join(f"{name:<{width}}  {text}" for name, text in hardware.PROFILES.items()))
        return 0
    hw = hardware.detect(args.simulate)
    if args.json:
        _print_json(hw.to_dict())
        return 0
    from rich.markup import escape
    from rich.table import Table

    from .workspace import home

    console = _console()
    gib = hardware.GiB
    facts = Table(title=f"hardware (simulated: {hw.simulated})" if hw.simulated else "hardware", title_justify="left",
                  show_header=False, box=None, padding=(0, 1))
    facts.add_column(no_wrap=True, style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("CPU", escape(f"{hw.cpu}, {hw.cores} logical CPUs usable"))
    facts.add_row("RAM", f"{hw.ram_total / gib:.1f} GiB total, {hw.ram_available / gib:.1f} GiB available")
    facts.add_row("disk", escape(f"{hw.disk_free / gib:.1f} GiB free at {home()}"))
    facts.add_row("GPUs", f"{len(hw.gpus)} NVIDIA, {hw.vram_total / gib:.1f} GiB VRAM in all" if hw.gpus
                  else "none: plans are for the CPU")
    if hw.gpus:
        facts.add_row("driver", f"{hw.driver or '?'}, CUDA {hw.cuda or '?'}")
        facts.add_row("bf16", "usable on every GPU" if hw.bf16 else "not on every GPU (compute capability < 8.0)")
        facts.add_row("bitsandbytes", {True: "CUDA kernels usable", False: "CUDA kernels not usable",
                                       None: "not checked"}[hw.bitsandbytes_cuda])
    console.print(facts)
    if hw.gpus:
        from rich import box

        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
        for header, width in (("#", 0), ("name", 0), ("GiB", 5), ("free", 5), ("cc", 3), ("bf16", 4), ("PCIe", 8),
                              ("°C", 3), ("W", 7), ("util", 4)):
            if width:
                table.add_column(header, no_wrap=True, min_width=width)
            else:
                table.add_column(header, no_wrap=True, overflow="ellipsis")
        for g in hw.gpus:
            power = "-" if g.power_w is None else f"{g.power_w:.0f}" + (
                f"/{g.power_limit_w:.0f}" if g.power_limit_w else "")
            table.add_row(str(g.index), escape(g.name), f"{g.memory_total / gib:.1f}", f"{g.memory_free / gib:.1f}",
                          "{}.{}".format(*g.compute_capability), "yes" if g.bf16 else "no", g.pcie or "-",
                          "-" if g.temperature_c is None else str(g.temperature_c), power,
                          "-" if g.utilization is None else f"{g.utilization}%")
        console.print(table)
    if hw.links:
        console.print("links: " + ", ".join(f"GPU {k}: {v}" for k, v in hw.links.items()))
    for note in hw.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    return 0


@command("tui")
def _tui(args) -> int:
    from . import hardware
    from .errors import InvalidInput

    if args.simulate is not None and args.simulate not in hardware.PROFILES:
        raise InvalidInput(f"unknown hardware profile {args.simulate!r}; choose one of: {', '.join(hardware.PROFILES)}.")
    try:
        from tui.app import run  # textual loads here only: the core never imports it
    except ModuleNotFoundError as e:
        if e.name not in ("tui", "textual"):
            raise
        raise InvalidInput(f"the terminal UI is not installed ({e}); install the appliance with its dependencies "
                           "(textual) or use the commands.") from None
    return run(simulate=args.simulate)


@command("demo")
def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(base=args.base, steps=args.steps, eval_samples=args.eval_samples, json_mode=args.json)
    if args.json:
        _print_json(result)
    return 0 if result["tuned_beats_base"] else 5


@command("audit log")
def _audit_log(args) -> int:
    from . import audit

    found = audit.entries(since=args.since, event=args.event)
    if args.json:
        _print_json({"entries": found})
        return 0
    from rich.table import Table

    table = Table("seq", "time (UTC)", "user", "event", "subjects", "details")
    for e in found:
        table.add_row(str(e["seq"]), e["time"][:19].replace("T", " "), e["user"], e["event"],
                      " ".join(f"{k}={v}" for k, v in e["subjects"].items()),
                      " ".join(f"{k}={v}" for k, v in e["details"].items())[:80])
    _console().print(table if found else "no audit entries match")
    return 0


@command("audit verify")
def _audit_verify(args) -> int:
    from . import audit, signing

    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = audit.verify(public)
    if args.json:
        _print_json({"ok": True, **result})
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
    from . import audit

    if args.out:
        print(f"wrote {audit.write_report(Path(args.out), since=args.since, until=args.until, fmt=args.format)}")
    else:
        print(audit.report(since=args.since, until=args.until, fmt=args.format))
    return 0


@command("verify")
def _verify(args) -> int:
    from . import provenance, signing

    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = provenance.verify(Path(args.path), public)
    if args.json:
        _print_json(result)
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
    from . import bundle
    from .errors import InvalidInput

    if args.run == "verify":
        if not args.dir:
            raise InvalidInput("name the bundle folder: `appliance bundle verify DIR`.")
        return _bundle_verify(args)
    if not args.out:
        raise InvalidInput(f"name a new folder for the bundle: `appliance bundle {args.run} --out DIR`.")
    from .render import reporter

    result = bundle.create(args.run, Path(args.out), quant=args.quant, emit=reporter(args.json))
    _print_json(result) if args.json else print(
        f"bundle written to {result['path']} ({result['model']}, {result['bytes'] / 2**20:.0f} MiB), "
        f"signed by {result['key'][:16]}...\non the edge box: appliance bundle verify DIR --fingerprint {result['key']}")
    return 0


def _bundle_verify(args) -> int:
    from . import bundle, signing
    from .errors import InvalidInput

    if args.fingerprint and args.pubkey:
        raise InvalidInput("give --pubkey or --fingerprint, not both.")
    public = signing.load_public(Path(args.pubkey)) if args.pubkey else None
    result = bundle.verify_bundle(Path(args.dir), public, fingerprint=args.fingerprint)
    if args.json:
        _print_json(result)
        return 0
    for item in result["lineage"]:
        print(f"{'ok    ' if item['status'] == 'ok' else 'absent'} {item['kind']} {item['id']}")
    print(f"bundle intact: {result['model']}, signed by {result['key']}")
    if not result["trusted_key"]:
        print("warning: checked against the key inside the bundle; pass --fingerprint or --pubkey with the appliance's "
              "key, obtained out of band, to prove where it came from.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
