"""The keys this process holds: its unlocked vault (the data keys) and, through it, the signing key.

A process unlocks the vault once, on first use (the passphrase from ``APPLIANCE_PASSPHRASE_FILE`` or a prompt),
or, in a training child, is handed the keys by its parent through a pipe (``use_vault`` with ``HandedKeys``), so
the passphrase never has to reach a detached process. Unlocking installs the signing key too (``keyring``).
"""

from __future__ import annotations

from ..errors import NotFound

_vault = None


def use_vault(vault) -> None:
    """Install what decrypts datasets in this process: an unlocked keyring, or keys handed over by a parent."""
    global _vault
    _vault = vault


def vault():
    """The process's unlocked vault, unlocking it on first use."""
    global _vault
    if _vault is None:
        from . import keyring, passphrase

        keyring.load()  # a missing vault is reported before a passphrase is asked for
        _vault = keyring.unlock(passphrase.read())
    return _vault


def ensure_signer() -> None:
    """Make sure this process can sign: unlock the vault (passphrase file or prompt) if it has not yet."""
    from . import keyring, signing

    if not signing.available():
        if not keyring.exists():
            raise NotFound(f"no vault at {keyring.path()}: the appliance signs every artifact with the key its vault "
                           "keeps; create the vault first with `appliance vault init`.")
        vault()  # unlocking installs the signing key


def use_handed(handed: dict) -> None:
    """Install the keys a parent handed over (``{"datasets": {id: hex}, "signing": hex}``, read from a pipe or
    passed in memory): the training child and its ranks decrypt and sign with them, never with a passphrase."""
    from . import signing

    use_vault(HandedKeys({k: bytes.fromhex(v) for k, v in handed.get("datasets", {}).items()}))
    if handed.get("signing"):
        signing.use(bytes.fromhex(handed["signing"]))


class HandedKeys:
    """Data keys handed to a child process by its parent; enough for ``store.read``."""

    def __init__(self, keys: dict[str, bytes]):
        self._keys = keys

    def data_key(self, dataset_id: str) -> bytes:
        if dataset_id not in self._keys:
            raise NotFound(f"this process was given no key for dataset {dataset_id!r}.")
        return self._keys[dataset_id]
