"""The trust layer: what makes the appliance's guarantees, below every stage and above the base.

- ``chunked``: C2SP chunked encryption (Cobblestone-256), the file format every dataset file is encrypted with;
- ``keyring``: the passphrase-derived KEK, the wrapped per-dataset keys and the wrapped signing key;
- ``passphrase``: where the passphrase comes from (a file or a prompt, never an argument);
- ``keys``: the keys this process holds (its unlocked vault, or keys handed over by a parent);
- ``store``: encrypted datasets (records as JSON Lines inside the ciphertext);
- ``signing``: the appliance's Ed25519 identity;
- ``audit``: the hash-chained audit log and its signed checkpoints;
- ``manifest`` and ``provenance``: signed artifact manifests and their lineage;
- ``egress``: the in-process egress guard and the guarded launcher for child processes.

Modules here import only each other and the base (errors, workspace, events); what they need from a stage (the
hardware summary in a manifest) their callers pass in.
"""
