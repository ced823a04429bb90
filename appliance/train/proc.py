"""The training process's shared state: what a signal handler sets and the callbacks read.

SIGTERM sets ``stop_requested`` once training has started (the step callback then saves a checkpoint and ends
the loop, so a stopped run loses nothing), or raises ``Stopped`` before (the launcher's agent forwards it to the
ranks); ``progress`` holds the global step reached (what an out-of-memory error is reported against).
"""

from __future__ import annotations

import os

STAGE = "train"
OOM_EXIT = 75  # a rank's exit status after an out-of-memory error (the launcher restarts the ranks)

stop_requested = False
training_started = False
progress = {"step": 0}


class Stopped(Exception):
    """A stop that arrived before training started: nothing to save."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process, as the launcher set them: (0, 1) when it trains alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_world() -> int:
    """How many ranks run on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def writes() -> bool:
    """Does this process write the run's files on this machine (events, checkpoint markers, the summary, the
    adapter, manifests, audit entries)? The first rank of each machine: every machine keeps a whole run folder."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def across_machines() -> bool:
    return world()[1] > local_world()
