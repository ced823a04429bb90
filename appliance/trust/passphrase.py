"""Where the passphrase comes from: a file named by an environment variable, or a prompt. Never an argument."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import InvalidInput, NotFound

ENV = "APPLIANCE_PASSPHRASE_FILE"
NEW_ENV = "APPLIANCE_NEW_PASSPHRASE_FILE"


def read(env: str = ENV, prompt: str = "vault passphrase: ", confirm: bool = False) -> str:
    file = os.environ.get(env)
    if file:
        p = Path(file).expanduser()
        if not p.is_file():
            raise NotFound(f"{env} names {p}, which does not exist; point it at a file holding the passphrase.")
        text = p.read_text(encoding="utf-8")
        return text[:-1] if text.endswith("\n") else text  # one trailing newline is the file's, not the passphrase's
    if not sys.stdin.isatty():
        raise InvalidInput(f"no passphrase: set {env} to a file holding it, or run in a terminal to be asked.")
    import getpass

    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise InvalidInput("the two passphrases differ; nothing was changed.")
    return first
