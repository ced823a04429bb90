"""What every command module shares: the registry of commands and the output helpers."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def rich_console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def version() -> str:
    from .. import __version__

    return __version__


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    from ..errors import InvalidInput

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInput(f"--set {pair!r} needs the form KEY=VALUE, e.g. --set training.max_steps=10.")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def unlocked():
    """This process's vault, unlocked (the passphrase file or a prompt) on first use."""
    from ..trust.keys import vault

    return vault()
