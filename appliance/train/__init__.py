"""Training: the child process that turns a recipe into an adapter (``python -m appliance.train.worker``).

- ``worker``: the entry point: reads the keys from its parent's pipe, handles a stop, trains in this process or
  launches the ranks, and reports a failure as an event and an audit entry;
- ``trainer``: set-up and fit (data, model, LoRA, SFTTrainer, out-of-memory recovery, summary, manifests);
- ``callbacks``: events, the stop, memory watching, out-of-memory handling, inside the Trainer;
- ``launcher``: data-parallel ranks under PyTorch's elastic agent, on one machine or several;
- ``proc``: the process's shared state: the flags a signal handler sets and the callbacks read.

``appliance.runs`` is the parent side (create, start, follow, stop, resume).
"""
