"""Time from process start to the TUI's first painted screen, vs a bare Textual app with one Static.

Each run is a fresh interpreter (so imports count, as they do for a user): the parent notes the monotonic clock
(system-wide on Linux) just before starting it, and the child prints the clock when its first screen has been
composed, laid out and rendered (``call_after_refresh`` from ``on_mount``), then exits. Headless: no terminal
output is timed. Median of 5 runs each, interleaved. The first screen is the Dashboard showing "reading the
workspace…": its figures arrive later, from a worker. Prints figures; never passes or fails.

    .venv/bin/python bench/tui_startup.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = 5

CHILD = {
    "appliance TUI (Dashboard)": """
import time
from tui.app import ApplianceApp

class Probe(ApplianceApp):
    def on_mount(self):
        self.call_after_refresh(self.painted)

    def painted(self):
        print(time.monotonic(), flush=True)
        self.exit()

Probe().run(headless=True, size=(100, 30))
""",
    "bare Textual App + one Static": """
import time
from textual.app import App
from textual.widgets import Static

class Probe(App):
    def compose(self):
        yield Static("hello")

    def on_mount(self):
        self.call_after_refresh(self.painted)

    def painted(self):
        print(time.monotonic(), flush=True)
        self.exit()

Probe().run(headless=True, size=(100, 30))
""",
}


def once(code: str, env: dict) -> float:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True,
                         timeout=60).stdout
    return float(out.strip().splitlines()[0]) - start


def main() -> None:
    env = {**os.environ, "APPLIANCE_HOME": tempfile.mkdtemp(prefix="appliance-bench-tui-")}
    times: dict[str, list[float]] = {name: [] for name in CHILD}
    for name, code in CHILD.items():  # one warm-up each: the first start reads the files from disk
        once(code, env)
    for _ in range(RUNS):
        for name, code in CHILD.items():
            times[name].append(once(code, env))
    print(f"process start to first paint, median of {RUNS} (min-max), {os.cpu_count()} CPUs:")
    for name, ts in times.items():
        print(f"  {name:<30} {statistics.median(ts) * 1000:6.0f} ms  ({min(ts) * 1000:.0f}-{max(ts) * 1000:.0f})")


if __name__ == "__main__":
    main()
