"""``appliance doctor``: the checks of every layer, as sections of (id, label, status, value, detail) lines.

The faces (the CLI's ``doctor`` and the TUI's Doctor screen) call ``sections``; nothing else imports this module,
which imports everything it reports on: the environment, the egress guard and the machine's interfaces and
routes, the vault and the audit log, the hardware, and llama.cpp's CPU backend.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from .trust import egress


def check(id: str, label: str, status: str, value, detail: str = "") -> dict:
    """One line of the doctor's report; status is ok, warn, fail or info."""
    assert status in ("ok", "warn", "fail", "info"), status
    return {"id": id, "label": label, "status": status, "value": value, "detail": detail}


def sections(hw) -> list[tuple[str, list[dict]]]:
    """The whole report as (section name, checks), for the hardware ``hw`` (``hardware.detect``: real or
    simulated, detected by the caller so that a bad profile name stops before any check runs)."""
    return [("environment", environment_checks()), ("air-gap", airgap_checks()), ("vault and audit", vault_checks()),
            ("hardware", hardware_checks(hw)), ("llama.cpp", llama_checks())]


def environment_checks() -> list[dict]:
    import platform
    import shutil

    from . import __version__
    from .workspace import home

    root = home()
    free = shutil.disk_usage(root).free
    return [
        check("version", "appliance version", "info", __version__),
        check("python", "python", "info", f"{platform.python_version()} ({sys.executable})"),
        check("workspace", "workspace", "info", str(root)),
        check("disk_free", "free disk at the workspace", "ok" if free >= 5 * 2**30 else "warn",
              f"{free / 2**30:.1f} GiB", "" if free >= 5 * 2**30 else "less than 5 GiB free"),
    ]


def airgap_checks() -> list[dict]:
    from . import OFFLINE_SWITCHES
    from .workspace import home

    out = [check("guard", "egress guard", "ok" if egress.installed() else "fail",
                 "installed" if egress.installed() else "not installed",
                 "sys.addaudithook (PEP 578) at `import appliance`; cannot be removed"
                 if egress.installed() else "`import appliance` should have installed it")]
    pol = egress.policy()
    if pol["forbidden"] or pol["ignored_entries"]:
        out.append(check("test_policy", "test policy (forbidden loopback)", "warn" if pol["ignored_entries"] else "info",
                         pol["forbidden"], f"ignored, not loopback: {pol['ignored_entries']}" if pol["ignored_entries"]
                         else ""))
    for key, want in OFFLINE_SWITCHES.items():
        got = os.environ.get(key)
        out.append(check(f"env.{key}", key, "ok" if got == want else "fail", got,
                         "" if got == want else f"should be {want!r}"))
    hf_home = os.environ.get("HF_HOME", "")
    inside = bool(hf_home) and os.path.realpath(hf_home).startswith(str(home()) + os.sep)
    out.append(check("env.HF_HOME", "HF_HOME", "ok" if inside else "warn", hf_home or None,
                     "" if inside else "library caches should stay inside the workspace"))
    up = [i for i in interfaces() if i["up"] and not i["loopback"]]
    out.append(check("interfaces", "interfaces up besides loopback", "warn" if up else "ok",
                     [i["name"] for i in up] or "none",
                     "; ".join(f"{i['name']}: {', '.join(i['addresses']) or 'no address'}" for i in up)
                     or "only loopback is up"))
    routes = default_routes()
    out.append(check("default_route", "default route", "warn" if routes else "ok",
                     [f"{r['family']} via {r['gateway']} dev {r['interface']}" for r in routes] or "none",
                     "this machine can route off-host; the guard is the inner wall only" if routes else ""))
    out += listener_checks()
    st = egress.self_test()
    out.append(check("self_test", "guard self-test", "ok" if st["ok"] else "fail",
                     "passed" if st["ok"] else "FAILED", st["detail"]))
    out[-1]["result"] = st
    return out


def listeners() -> list[dict]:
    """Every TCP socket listening in this network namespace (the kernel's /proc/net/tcp and tcp6), loopback or
    not; the appliance's own servers are named."""
    from .serve import running

    ours = {(s["host"], int(s["port"])): s for s in running()}
    out = []
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            port = int(hex_port, 16)
            server = ours.get((str(ip), port))
            out.append({"address": str(ip), "port": port, "loopback": ip.is_loopback,
                        "appliance": f"serve {server['model']} (pid {server['pid']})" if server else None})
    return sorted(out, key=lambda r: (not r["loopback"], r["address"], r["port"]))


def listener_checks() -> list[dict]:
    from .cluster import peers as declared, show
    from .serve import allowed_hosts

    found = listeners()
    peers = [show(p["address"], p["port"]) for p in declared()]
    shown = lambda r: (f"[{r['address']}]" if ":" in r["address"] else r["address"]) + f":{r['port']}" + (  # noqa: E731
        f" ({r['appliance']})" if r["appliance"] else "")
    open_ = [r for r in found if not r["loopback"]]
    ours = [r for r in found if r["appliance"]]
    allowed = allowed_hosts()
    return [
        check("listeners", "listening sockets (TCP)", "warn" if open_ else "ok",
              [shown(r) for r in found] or "none",
              (f"reachable from the network: {', '.join(shown(r) for r in open_)}" if open_ else
               "all on loopback") + (f"; the appliance serves {', '.join(shown(r) for r in ours)}" if ours else "")),
        check("serve_hosts", "addresses `serve --host` may use", "info" if allowed else "ok",
              allowed or "loopback only", "declared with `appliance serve allow ADDRESS`" if allowed else ""),
        check("cluster_peers", "cluster peers training may reach", "info" if peers else "ok", peers or "none",
              "declared with `appliance cluster allow HOST[:PORT]`; only training runs with --nnodes reach them"
              if peers else "training stays on this machine (loopback only)"),
        *([check("cluster_link", "what crosses the cluster's network", "warn",
                 "gradients in clear",
                 "the agreement between nodes is sealed with the cluster secret, but gloo/NCCL send gradients (which "
                 "can leak training text) unencrypted: unless the network between the nodes is trusted, put them on "
                 "an encrypted link (WireGuard; README, Training across machines) and declare those addresses")]
          if peers else []),
    ]


def vault_checks() -> list[dict]:
    from .trust import audit, keyring

    entries = audit.entries()
    blocked = [e for e in entries if e.get("event") == "network.blocked"]
    real = [e for e in blocked if not (e.get("details") or {}).get("self_test")]
    rows = [check("keyring", "vault keyring", "info", "present" if keyring.exists() else "absent", str(keyring.path()))]
    if keyring.exists():  # what `appliance vault status` shows, read without the passphrase
        st = keyring.status()
        params = ", ".join(f"{k}={v}" for k, v in sorted(st["kdf"].items()) if k != "name")
        rows.append(check("kdf", "passphrase KDF", "info", st["kdf"]["name"],
                          f"{params}; {len(st['datasets'])} dataset keys"
                          + (f"; rekeyed {st['rekeyed']}" if st.get("rekeyed") else "")))
        rows.append(check("signing_key", "signing key fingerprint", "info",
                          (st["signing_key"] or "none")[:16] + ("…" if st["signing_key"] else ""),
                          st["signing_key"] or "no signing key yet: the next unlock adds one"))
    return rows + [
        check("audit_log", "audit log entries", "info", len(entries), str(audit.log_path())),
        check("network_blocked", "blocked network attempts recorded", "warn" if real else "ok", len(real),
              f"{len(blocked) - len(real)} more from self-tests"
              + ("; see `appliance audit log` (event network.blocked)" if real else "")),
    ]


def interfaces() -> list[dict]:
    """Network interfaces of this process's network namespace, read from the kernel; sends nothing.

    Names come from /proc/net/dev and flags from the SIOCGIFFLAGS ioctl on a Unix socket: /sys/class/net shows the
    namespace that mounted /sys, so inside ``unshare -n`` it would still list the host's interfaces.
    """
    import fcntl
    import socket
    import struct

    names = []
    try:
        with open("/proc/net/dev") as f:
            names = [line.split(":", 1)[0].strip() for line in f.readlines()[2:] if ":" in line]
    except OSError:
        pass
    v6: dict[str, list[str]] = {}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    v6.setdefault(parts[5], []).append(str(ipaddress.IPv6Address(int(parts[0], 16))))
    except OSError:
        pass
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ux, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
        for name in names:
            try:
                raw = fcntl.ioctl(ux, 0x8913, struct.pack("16sH14x", name.encode()[:15], 0))  # SIOCGIFFLAGS
                flags = struct.unpack("16sH14x", raw)[1]
            except OSError:
                flags = 0
            addresses = []
            try:
                raw = fcntl.ioctl(s4, 0x8915, struct.pack("16s16x", name.encode()[:15]))  # SIOCGIFADDR: local query
                addresses.append(socket.inet_ntoa(raw[20:24]))
            except OSError:
                pass
            addresses += v6.get(name, [])
            out.append({"name": name, "up": bool(flags & 0x1), "running": bool(flags & 0x40),
                        "loopback": bool(flags & 0x8), "addresses": addresses})
    return out


def default_routes() -> list[dict]:
    """Default routes (IPv4 from /proc/net/route, IPv6 from /proc/net/ipv6_route); reject routes do not count."""
    import socket
    import struct

    routes = []
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                p = line.split()
                if len(p) >= 8 and p[1] == "00000000" and p[7] == "00000000" and int(p[3], 16) & 0x1:
                    routes.append({"family": "ipv4", "interface": p[0],
                                   "gateway": socket.inet_ntoa(struct.pack("<I", int(p[2], 16)))})
    except OSError:
        pass
    try:
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                p = line.split()
                if len(p) < 10 or p[0] != "0" * 32 or p[1] != "00":
                    continue
                flags = int(p[8], 16)
                if flags & 0x1 and not flags & 0x0200 and p[9] != "lo":  # RTF_UP, not RTF_REJECT
                    routes.append({"family": "ipv6", "interface": p[9],
                                   "gateway": str(ipaddress.IPv6Address(int(p[4], 16)))})
    except OSError:
        pass
    return routes


def hardware_checks(hw) -> list[dict]:
    """The "hardware" section. Nothing here fails the doctor: a missing GPU or bf16 is a fact or a warning."""
    from .hardware import GiB, compute_dtype, describe_gpu, flag_names

    out = []
    if hw.simulated:
        out.append(check("simulated", "simulated profile", "info", hw.simulated,
                         "figures are the profile's, not this machine's (the free disk is this machine's)"))
    out.append(check("cpu", "CPU", "info", f"{hw.cpu} ({hw.cores} logical CPUs usable)",
                     flag_names(hw.cpu_flags)))
    dtype, why = compute_dtype(hw)
    out.append(check("cpu_bf16", "bfloat16 on the CPU", "ok" if hw.cpu_bf16 else "info",
                     "native" if hw.cpu_bf16 else "emulated (slow)",
                     why if not hw.gpus else f"{why}; training computes in {dtype} on the GPUs"))
    low = hw.ram_available < 4 * GiB
    out.append(check("ram", "RAM", "warn" if low else "ok",
                     f"{hw.ram_total / GiB:.1f} GiB total, {hw.ram_available / GiB:.1f} GiB available",
                     "less than 4 GiB available" if low else ""))
    out.append(check("disk_free", "free disk at the workspace", "info", f"{hw.disk_free / GiB:.1f} GiB"))
    if not hw.gpus:
        out.append(check("gpus", "NVIDIA GPUs", "info", "none", next((n for n in hw.notes if n.startswith("no NVIDIA")),
                                                                  "plans are for the CPU")))
        return out
    out.append(check("gpus", "NVIDIA GPUs", "ok", f"{len(hw.gpus)}: " + ", ".join(g.name for g in hw.gpus)))
    out.append(check("driver", "driver / CUDA", "info", f"{hw.driver or '?'} / CUDA {hw.cuda or '?'}"))
    for g in hw.gpus:
        hot = g.temperature_c is not None and g.temperature_c >= 85
        out.append(check(f"gpu{g.index}", f"GPU {g.index}", "warn" if hot else "ok", describe_gpu(g),
                         f"{g.temperature_c} °C" if hot else ""))
    if hw.links:
        out.append(check("links", "links between GPUs", "info", [f"{k}: {v}" for k, v in hw.links.items()]))
    out.append(check("bf16", "bf16", "ok" if hw.bf16 else "warn", "usable" if hw.bf16 else "not on every GPU",
                     "" if hw.bf16 else "compute capability below 8.0: use compute_dtype: float16"))
    bnb = hw.bitsandbytes_cuda
    out.append(check("bitsandbytes", "bitsandbytes CUDA kernels", {True: "ok", False: "warn"}.get(bnb, "info"),
                     {True: "usable", False: "not usable", None: "not checked"}[bnb],
                     "QLoRA (nf4) on the GPUs needs them" if bnb is False else
                     ("assumed from compute capability >= 6.0" if hw.simulated else "")))
    return out


def llama_checks() -> list[dict]:
    """The "llama.cpp" section: the CPU variant in use and its features, probed in a child process."""
    from .llama_runtime import ENV_FORCE, probe

    found = probe()
    if "error" in found:
        return [check("llama_cpu", "llama.cpp CPU backend", "fail", "does not load", found["error"])]
    portable = bool(found["variants"])
    return [
        check("llama_cpu", "llama.cpp CPU backend", "ok" if portable else "warn", found["variant"],
              (f"chosen at run time from {len(found['variants'])} variants: {', '.join(found['variants'])}"
               + (f" (forced by {ENV_FORCE})" if found["forced"] else ""))
              if portable else "a host-specific build: rebuild with scripts/setup.sh for the portable one"),
        check("llama_features", "llama.cpp CPU features", "info", ", ".join(found["features"]) or "none",
              found["system_info"]),
    ]
