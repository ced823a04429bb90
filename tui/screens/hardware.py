"""Hardware: the detected machine (or a simulated profile), and live RAM and per-GPU memory with sparklines."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Sparkline, Static

from .base import Pane

GiB = 2**30
HISTORY = 60  # samples kept per sparkline: a minute at one a second


def default_sampler(simulate: str | None) -> Callable[[], dict]:
    """``hardware.sample``, reading the simulated profile's GPUs when one is named (RAM is always this machine's)."""
    def sample() -> dict:
        from appliance import hardware

        return hardware.sample(hardware.FakeNVML.for_profile(simulate) if simulate else None)
    return sample


def facts_text(hw) -> str:
    from appliance.hardware import compute_dtype, describe_cpu

    rows = [("CPU", describe_cpu(hw))]
    if not hw.gpus:  # with GPUs they compute; the CPU's bfloat16 decides nothing
        rows.append(("bf16", "native on the CPU" if hw.cpu_bf16 else "emulated on the CPU (float32 is faster)"))
    rows += [("compute", f"{compute_dtype(hw)[0]} (compute_dtype: auto)"),
            ("RAM", f"{hw.ram_total / GiB:.1f} GiB"),
            ("GPUs", f"{len(hw.gpus)} NVIDIA, {hw.vram_total / GiB:.1f} GiB VRAM in all" if hw.gpus
             else "none: plans are for the CPU")]
    if hw.gpus:
        rows.append(("driver", f"{hw.driver or '?'}, CUDA {hw.cuda or '?'}"))
        rows.append(("bf16", "usable on every GPU" if hw.bf16 else "not on every GPU (compute capability < 8.0)"))
        for g in hw.gpus:
            rows.append((f"GPU {g.index}", f"{g.name}, {g.memory_total / GiB:.1f} GiB, cc "
                         f"{g.compute_capability[0]}.{g.compute_capability[1]}, {g.pcie or 'PCIe ?'}"))
    if hw.links:
        rows.append(("links", ", ".join(f"GPU {k}: {v}" for k, v in hw.links.items())))
    title = f"[b]hardware[/] (simulated: {escape(hw.simulated)})" if hw.simulated else "[b]hardware[/]"
    lines = [title] + [f"[b]{k:>7}[/]  {escape(v)}" for k, v in rows]
    lines += [f"[dim]note: {escape(n)}[/]" for n in hw.notes]
    return "\n".join(lines)


class HardwareScreen(Pane):
    DEFAULT_CSS = """
    HardwareScreen #facts { height: auto; margin: 0 1 1 1; }
    HardwareScreen .live-label { margin: 0 1; }
    HardwareScreen Sparkline { height: 2; margin: 0 1 1 1; }
    HardwareScreen #gpus { height: auto; }
    """

    def __init__(self, simulate: str | None = None, sampler: Callable[[], dict] | None = None,
                 interval: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.simulate = simulate
        self.sampler = sampler or default_sampler(simulate)
        self.interval = interval
        self.ram: deque[float] = deque(maxlen=HISTORY)
        self.gpu: dict[int, tuple[deque[float], Label, Sparkline]] = {}
        self.samples = 0

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("detecting hardware…", id="facts")
            yield Label("RAM", id="ram-label", classes="live-label")
            yield Sparkline([], id="ram-spark")
            yield Vertical(id="gpus")

    def on_mount(self) -> None:
        self.refresh_data()
        self.tick()
        self.set_interval(self.interval, self.tick)

    def refresh_data(self) -> None:
        simulate = self.simulate

        def detect():
            from appliance import hardware

            # bitsandbytes is not checked here: it would load torch into the UI's process (`appliance hw` checks it).
            return hardware.detect(simulate, check_bitsandbytes=False)

        self.call(detect, lambda hw: self.query_one("#facts", Static).update(facts_text(hw)), group="detect")

    def tick(self) -> None:
        self.call(self.sampler, self.show_sample, group="sample")

    def show_sample(self, s: dict) -> None:
        self.samples += 1
        total = s["ram_used"] + s["ram_available"]
        self.ram.append(s["ram_used"] / GiB)
        where = "this machine's RAM" if self.simulate else "RAM"
        self.query_one("#ram-label", Label).update(
            f"{where}: {s['ram_used'] / GiB:.1f} of {total / GiB:.1f} GiB in use")
        self.query_one("#ram-spark", Sparkline).data = list(self.ram)
        box = self.query_one("#gpus")
        for g in s["gpus"]:
            i = g["index"]
            if i not in self.gpu:
                self.gpu[i] = (deque(maxlen=HISTORY), Label("", id=f"gpu-label-{i}", classes="live-label"),
                               Sparkline([], id=f"gpu-spark-{i}"))
                box.mount(*self.gpu[i][1:])
            history, label, spark = self.gpu[i]
            used, total_g = g.get("memory_used"), g.get("memory_total")
            if used is None or not total_g:
                text = f"GPU {i}: memory not readable"
            else:
                history.append(used / GiB)
                extra = [f"{g['utilization']}% busy" if g.get("utilization") is not None else None,
                         f"{g['temperature_c']} °C" if g.get("temperature_c") is not None else None,
                         f"{g['power_w']:.0f} W" if g.get("power_w") is not None else None]
                text = f"GPU {i}: {used / GiB:.1f} of {total_g / GiB:.1f} GiB in use" + "".join(
                    f", {x}" for x in extra if x)
            label.update(text)
            spark.data = list(history)

