"""The encrypted vault (in progress, issue #3).

``chunked``: C2SP chunked encryption (Cobblestone-256), the file format every
dataset file is encrypted with: streaming in both directions, bounded memory,
key-committing, truncation- and reordering-proof.
"""
