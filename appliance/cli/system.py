"""`appliance doctor`, `appliance hw` and `appliance cluster`: the machine, its guarantees, and its peers."""

from __future__ import annotations

from .common import command, rich_console, print_json


def parsers(add) -> None:
    doc = add("doctor", "environment, air-gap and hardware self-check: egress guard, offline switches, interfaces, "
                        "routes, CPU, RAM, GPUs")
    doc.add_argument("--simulate", metavar="PROFILE", help="report the hardware of a named profile (see `appliance hw "
                                                           "--list-profiles`) instead of this machine's")

    from ..hardware import PROFILES

    hw = add("hw", "detected hardware: CPU, cores, RAM, free disk, NVIDIA GPUs (NVML: VRAM, compute capability, "
                   "driver, CUDA, temperature, power, PCIe, NVLink/P2P), bf16 and bitsandbytes")
    hw.add_argument("--simulate", metavar="PROFILE",
                    help=f"a named profile instead of this machine: {', '.join(PROFILES)}")
    hw.add_argument("--list-profiles", action="store_true", help="list the profiles --simulate accepts")

    c = add("cluster", "the machines this one may train with (loopback only until declared; audited)", json_out=False)
    csub = c.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    for name, help in (("allow", "declare peers by address: HOST or HOST:PORT (the port: the only one the appliance "
                                 "connects to there, e.g. the rendezvous)"),
                       ("list", "the declared peers"), ("revoke", "take a peer back")):
        sp = csub.add_parser(name, help=help)
        if name == "allow":
            sp.add_argument("peers", nargs="+", metavar="HOST[:PORT]")
        elif name == "revoke":
            sp.add_argument("peer", metavar="HOST")
        sp.add_argument("--json", action="store_true")
    cs = csub.add_parser("secret", help="the secret every node of a cluster shares (kept in the vault): create "
                                        "prints it once, import takes it on the other machines, show its fingerprint")
    cs.add_argument("action", choices=["create", "import", "show"])
    cs.add_argument("--file", help="import: read the secret from this file (else a prompt); create: also write it "
                                   "here (mode 0600), e.g. on removable media for the other machines")
    cs.add_argument("--json", action="store_true")


@command("doctor")
def _doctor(args) -> int:
    from .. import doctor, hardware
    from ..errors import CheckFailed

    # A check's status is ok, warn, fail or info; only a fail (the guard, its self-test, an offline switch, a
    # llama.cpp that does not load) fails the command: an interface that is up or a default route is a warning
    # (CI machines have a network).
    hw = hardware.detect(getattr(args, "simulate", None))  # an unknown profile stops here, before any check runs
    sections = doctor.sections(hw)
    failed = [f"{name}: {c['label']}" for name, checks in sections for c in checks if c["status"] == "fail"]
    warned = [f"{name}: {c['label']}" for name, checks in sections for c in checks if c["status"] == "warn"]
    if args.json:
        print_json({"ok": not failed, "failures": failed, "warnings": warned,
                     "sections": {name: {c["id"]: c for c in checks} for name, checks in sections}})
    else:
        from rich.markup import escape
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red bold]FAIL[/]", "info": ""}
        console = rich_console()
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
    from .. import hardware

    if args.list_profiles:
        if args.json:
            print_json({"profiles": hardware.PROFILES})
        else:
            width = max(map(len, hardware.PROFILES))
            print("\n".join(f"{name:<{width}}  {text}" for name, text in hardware.PROFILES.items()))
        return 0
    hw = hardware.detect(args.simulate)
    if args.json:
        print_json(hw.to_dict())
        return 0
    from rich.markup import escape
    from rich.table import Table

    from ..workspace import home

    console = rich_console()
    gib = hardware.GiB
    facts = Table(title=f"hardware (simulated: {hw.simulated})" if hw.simulated else "hardware", title_justify="left",
                  show_header=False, box=None, padding=(0, 1))
    facts.add_column(no_wrap=True, style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("CPU", escape(hardware.describe_cpu(hw)))
    dtype, why = hardware.compute_dtype(hw)
    if not hw.gpus:  # with GPUs they compute; the CPU's bfloat16 decides nothing
        facts.add_row("bf16 (CPU)", "native" if hw.cpu_bf16 else "emulated: float32 is the fast choice on this CPU")
    facts.add_row("compute", escape(f"{dtype} (compute_dtype: auto): {why}"))
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


def _print_peers(peers: list[dict], json_mode: bool) -> None:
    from ..cluster import show

    if json_mode:
        print_json({"peers": peers})
        return
    if not peers:
        print("no peers declared: training stays on this machine (loopback only)")
    for p in peers:
        print(f"{show(p['address'], p['port']):<28} declared {p['added']}")


@command("cluster allow")
def _cluster_allow(args) -> int:
    from .. import cluster

    _print_peers(cluster.allow(args.peers), args.json)
    return 0


@command("cluster list")
def _cluster_list(args) -> int:
    from .. import cluster

    _print_peers(cluster.peers(), args.json)
    return 0


@command("cluster revoke")
def _cluster_revoke(args) -> int:
    from .. import cluster

    _print_peers(cluster.revoke(args.peer), args.json)
    return 0


@command("cluster secret")
def _cluster_secret(args) -> int:
    import sys
    from pathlib import Path

    from .. import cluster
    from ..errors import InvalidInput, NotFound
    from .common import unlocked

    vault = unlocked()
    if args.action == "create":
        made = cluster.create_secret(vault)
        if args.file:
            from ..workspace import atomic_writer

            with atomic_writer(Path(args.file).expanduser()) as f:  # mkstemp's mode: 0600
                f.write((made["secret"] + "\n").encode())
        if args.json:
            print_json(made)
        else:
            print(made["secret"])
            print(f"cluster secret {made['fingerprint']}: shown this once; on every other node `appliance cluster "
                  "secret import` it, then compare `appliance cluster secret show`", file=sys.stderr)
        return 0
    if args.action == "import":
        if args.file:
            path = Path(args.file).expanduser()
            if not path.is_file():
                raise NotFound(f"--file {path} does not exist.")
            text = path.read_text(encoding="utf-8")
        elif sys.stdin.isatty():
            import getpass

            text = getpass.getpass("cluster secret: ")
        else:
            raise InvalidInput("cluster secret import: give --file FILE holding the secret, or run in a terminal to "
                               "be asked.")
        made = cluster.import_secret(vault, text)
    else:
        secret = cluster.secret_of(vault)
        if secret is None:
            raise NotFound("this vault holds no cluster secret; `appliance cluster secret create` (on one machine) "
                           "or `import` (on the others).")
        made = {"fingerprint": cluster.secret_fingerprint(secret)}
    if args.json:
        print_json(made)
    else:
        print(f"cluster secret fingerprint {made['fingerprint']} (the same on every node of the cluster)")
    return 0
