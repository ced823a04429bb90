"""The training process's shared state: what a signal handler sets and the callbacks read.

SIGTERM sets ``stop_requested`` once training has started (the step callback then saves a checkpoint and ends
the loop, so a stopped run loses nothing), or raises ``Stopped`` before; a supervisor forwards it to its
``children``; ``progress`` holds the global step reached (what an out-of-memory error is reported against).
"""

from __future__ import annotations

import os

STAGE = "train"
OOM_EXIT = 75  # a rank's exit status after an out-of-memory error (its supervisor restarts the ranks)

stop_requested = False
training_started = False
children: list = []  # a supervisor's rank processes (SIGTERM is forwarded to them)
progress = {"step": 0}


class Stopped(Exception):
    """A stop that arrived before training started: nothing to save."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless it is one of a supervisor's ranks."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
