"""The training child process: ``python -m appliance.train.worker RUN_DIR [--resume] [--processes N]``.

QLoRA (bitsandbytes NF4 with double quantization + PEFT LoRA on all linear
layers) through TRL's SFTTrainer, with the loss on assistant tokens only and
the tokenizer's own chat template. Everything it has to say goes into
``RUN_DIR/events.jsonl``; it prints nothing a user needs. It knows nothing of
who follows it.

Resume: the Trainer restores model, optimizer, scheduler and RNG states from
the newest checkpoint marked COMPLETE and skips the batches already seen, so a
resumed run ends with the same loss as an uninterrupted one.

Memory: every step (at most once a second) it samples the process's RSS, the
system's RAM and, on CUDA, torch's allocated/peak/reserved bytes and NVML's
used/total for its GPU; the figures ride on the progress events, and one
``warning`` event is written the first time use crosses the soft threshold
(``APPLIANCE_MEMORY_WARN_FRACTION``, else the plan's limit, else 90% of RAM or
of the GPU). An out-of-memory error does not end the run: the model and
trainer are torn down, the micro-batch is halved and gradient accumulation
doubled (the same effective batch), and training continues from the last
complete checkpoint; the new batch is kept in ``overrides.json`` so a later
``runs resume`` keeps it, and the recovery is in the events, the summary and
the audit log.

Data parallelism (``--processes N``, and ``--nnodes M --node-rank R --rdzv HOST:PORT`` across machines): this
process reads the keys from its parent's pipe and becomes the machine's launcher: PyTorch's elastic agent starts
the ranks (``launcher``), hands each its keys in memory, forwards a stop, and restarts them with a halved
micro-batch after an out-of-memory error. The first rank of each machine writes that machine's run folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from .. import events as ev
from ..errors import ApplianceError
from ..trust import audit, keys
from ..workspace import read_json, write_json
from . import proc
from .launcher import Topology, launch
from .trainer import train


def main(argv: list[str]) -> int:
    run = Path(argv[0])
    resume = "--resume" in argv[1:]
    topology = Topology.from_argv(argv)
    handed: dict = {}
    if "--keys-fd" in argv:
        fd = int(argv[argv.index("--keys-fd") + 1])
        with os.fdopen(fd, "rb") as pipe:
            handed = json.loads(pipe.read() or b"{}")
        keys.use_handed(handed)
    emit = ev.EventLog(run / "events.jsonl")
    info = read_json(run / "run.json")
    info["pid"] = os.getpid()
    write_json(run / "run.json", info)

    def on_term(signum, frame):  # once the ranks run, the launcher's agent has its own (it forwards the stop)
        if proc.training_started:
            proc.stop_requested = True
        else:
            raise proc.Stopped()

    signal.signal(signal.SIGTERM, on_term)
    try:
        from ..runs import load_recipe

        if topology.world > 1:
            launch(run, load_recipe(run.name), resume, emit, topology, handed)
        else:
            train(run, load_recipe(run.name), resume, emit)
        return 0
    except proc.Stopped:
        emit(ev.Event("warning", proc.STAGE, "stopped on request; `appliance runs resume` continues from the last checkpoint"))
        return 0
    except ApplianceError as e:
        emit(ev.Event("failed", proc.STAGE, str(e)))
        audit.record("train.fail", {"run": run.name}, {"error": str(e)[:300]})
        return 1
    except Exception as e:
        traceback.print_exc()  # to worker.log; tracebacks hold code and shapes, never dataset text
        emit(ev.Event("failed", proc.STAGE, f"{type(e).__name__}: {e}"))
        audit.record("train.fail", {"run": run.name}, {"error": f"{type(e).__name__}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
