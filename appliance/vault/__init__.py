"""The encrypted vault (in progress, issue #3).

- ``chunked``: C2SP chunked encryption (Cobblestone-256), the file format every
  dataset file is encrypted with: streaming both ways, bounded memory,
  key-committing, truncation- and reordering-proof;
- ``keyring``: the passphrase-derived KEK and the wrapped per-dataset keys;
- ``store``: encrypted datasets (records as JSON Lines inside the ciphertext);
- ``passphrase``: where the passphrase comes from (a file or a prompt).
"""
