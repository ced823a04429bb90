"""The ``appliance`` command: a thin shell over the library.

Every command that reports takes ``--json`` and prints one JSON object. A user
mistake (an ApplianceError) becomes one sentence on stderr and a non-zero exit,
never a traceback. Heavy libraries load inside the commands that need them, so
``appliance --help`` is instant.

One module per group of commands (models; vault and data; plan, train and
runs; merge, export and eval; ask and chat; serve; audit, verify and bundle; doctor
and hw; demo and tui), each with its ``parsers(add)`` and its commands
registered with ``@command``; this module assembles the parser and runs one.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ApplianceError
from . import answers, artifacts, data, demo, models, records, serving, system, training
from .common import COMMANDS, version


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Offline fine-tuning appliance: import, train, merge, export, ask.")
    p.add_argument("--version", action="version", version=f"appliance {version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def add(name: str, help: str, json_out: bool = True, hidden: bool = False, **kw) -> argparse.ArgumentParser:
        # hidden: reached through another command's words (`serve keys` -> serve-keys), not listed on its own
        sp = sub.add_parser(name, description=help, **({} if hidden else {"help": help}), **kw)
        if json_out:
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        return sp

    # In the order `appliance --help` lists them: the pipeline's, from the demo to the terminal UI.
    for parsers in (demo.demo_parser, system.parsers, models.parsers, data.parsers, training.parsers,
                    artifacts.parsers, answers.parsers, serving.parsers, records.parsers, demo.tui_parser):
        parsers(add)
    return p


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # the `appliance` command itself, not a caller passing arguments in-process
    parser = build_parser()
    args = parser.parse_args(serving.rewrite(sys.argv[1:] if argv is None else list(argv)))
    if args.cmd is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):  # a pipe or a script: the help, as always
            parser.print_help()
            return 0
        args = parser.parse_args(["tui"])
    key = args.cmd if getattr(args, "sub", None) is None else f"{args.cmd} {args.sub}"
    if from_shell and args.cmd in NATIVE:
        from .. import native_crash

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
