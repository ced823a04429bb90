"""The appliance's terminal UI (Textual).

It calls only the public functions of the ``appliance`` package, and the core
never imports it (``appliance tui`` loads it lazily). Every library call runs in
a worker thread, so the first screen paints before anything heavy loads and the
UI thread never waits on a disk, NVML or a training run.
"""
