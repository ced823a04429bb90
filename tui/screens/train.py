"""Train: the runs, and one run followed live from its events file (a run started from the CLI reattaches here).

Following never starts or owns the run: the training worker is its own process, so closing the TUI leaves it
training, and reopening follows it again from the file. What the screen shows is folded from the events alone
(``RunView``): the training loss per step and the validation loss on one chart, the learning rate, tokens/s, the
step, the elapsed time and an ETA from the events' timestamps, the worker's memory against RAM (and its GPU's), and
a log of stages, checkpoints, warnings, out-of-memory recoveries and the end. Stop asks the worker to stop (it
saves a checkpoint and stays resumable); Resume starts it again detached, as `appliance runs resume --detach`, and
follows it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from rich.markup import escape
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Button, DataTable, Label, ProgressBar, RichLog, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from .base import Pane, require_unlocked

GiB = 2**30
REDRAW = 0.25  # seconds: the chart, the figures and the gauges are redrawn at most 4 times a second
RATE_WINDOW = 20  # progress events the ETA's rate is measured over (the recent pace, not the whole run's)
RESUMABLE = ("interrupted", "failed", "created")  # what runs.resume accepts (it refuses running and finished)


@dataclass
class RunEvent(Message):
    """One event of the followed run, posted from the follower thread."""

    run_id: str
    event: object  # appliance.events.Event
    earlier: bool = False  # from an attempt before the latest (its end is not the run's state)


@dataclass
class FollowEnded(Message):
    run_id: str


def attempt_start(e) -> bool:
    """The event that opens an attempt (the first start, or a resume): the worker's first stage event."""
    return e.type == "stage" and "resume" in e.data


def duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class RunView:
    """What the screen shows of a run, folded from its events in order (no widgets: tested on its own).

    ``add`` returns the line the event adds to the log, if any, as (kind, text)."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}  # step -> training loss (a resumed attempt's repeat of a step wins)
        self.val: dict[int, float] = {}  # step -> validation loss
        self.last: dict = {}  # the latest progress event's data (loss, lr, tokens/s, memory...)
        self.rates: dict = {}  # the latest of each figure that not every progress event carries
        self.max_steps: int | None = None
        self.step = 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.attempt_t: float | None = None  # when the current attempt began
        self.before = 0.0  # seconds spent by the earlier attempts
        self.pace: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)  # (t, step) of recent progress events
        self.ended: str | None = None  # "finished" or "failed" once the run says so
        self.memory_warning = ""  # the device a memory warning was about ("RAM", "GPU 0"), once one came

    def add(self, e) -> tuple[str, str] | None:
        t = float(e.t or 0.0)
        if self.first_t is None:
            self.first_t = t
        if attempt_start(e) or self.attempt_t is None:
            if self.attempt_t is not None and self.last_t is not None:
                self.before += max(0.0, self.last_t - self.attempt_t)
            self.attempt_t = t
            self.pace.clear()
            self.ended = None
        self.last_t = t
        d = e.data or {}
        if e.type == "progress":
            self.last = d
            if isinstance(d.get("step"), int):
                self.step = d["step"]
                self.pace.append((t, d["step"]))
            if d.get("max_steps"):
                self.max_steps = int(d["max_steps"])
            if isinstance(d.get("loss"), (int, float)):
                self.train[int(d.get("step", len(self.train) + 1))] = float(d["loss"])
            for k in ("learning_rate", "tokens_per_s", "grad_norm", "reward_margin", "reward_accuracy"):
                if isinstance(d.get(k), (int, float)):
                    self.rates[k] = float(d[k])
            return None
        if e.type == "metric":
            if isinstance(d.get("eval_loss"), (int, float)):
                step = int(d.get("step", self.step))
                self.val[step] = float(d["eval_loss"])
                dpo = (f", reward margin {d['eval_reward_margin']:.3f}, reward accuracy {d['eval_reward_accuracy']:.0%}"
                       if isinstance(d.get("eval_reward_accuracy"), (int, float)) else "")
                best = " (best so far)" if d.get("best") else ""
                return "metric", f"step {step}: validation loss {d['eval_loss']:.4f}{dpo}{best}"
            if d.get("checkpoint"):
                return "checkpoint", f"{d['checkpoint']} saved"
            return None
        if e.type in ("finished", "failed"):
            self.ended = e.type
        if e.type == "warning":
            if "oom_recovery" in d:
                return "oom", f"out-of-memory recovery: {e.message}"
            if "memory" in d:
                self.memory_warning = str(d.get("device") or "RAM")
        return (e.type, e.message) if e.message else None

    # -- figures ---------------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        if self.attempt_t is None or self.last_t is None:
            return 0.0
        return self.before + max(0.0, self.last_t - self.attempt_t)

    def eta(self) -> float | None:
        """Seconds left at the recent pace (steps per second between recent progress events), None if unknown."""
        if self.ended or not self.max_steps or len(self.pace) < 2:
            return None
        (t0, s0), (t1, s1) = self.pace[0], self.pace[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0, self.max_steps - s1) * (t1 - t0) / (s1 - s0)

    def stats(self, live: bool = True) -> str:
        """The figures over the chart (whose legend holds the latest training and validation loss); an ETA only
        while the run is ``live``."""
        parts = [f"step {self.step}/{self.max_steps}" if self.max_steps else f"step {self.step}"]
        if "learning_rate" in self.rates:
            parts.append(f"lr {self.rates['learning_rate']:.2e}")
        if "tokens_per_s" in self.rates:
            parts.append(f"{self.rates['tokens_per_s']:.0f} tok/s")
        if "reward_margin" in self.rates:  # DPO
            parts.append(f"reward margin {self.rates['reward_margin']:.3f}")
        if "reward_accuracy" in self.rates:
            parts.append(f"reward accuracy {self.rates['reward_accuracy']:.0%}")
        if self.attempt_t is not None:
            parts.append(f"elapsed {duration(self.elapsed())}")
        eta = self.eta()
        if self.ended:
            parts.append(self.ended)
        elif eta is not None and live:
            parts.append(f"ETA {duration(eta)}")
        return " · ".join(parts)

    def latest(self, which: str) -> float | None:
        points = self.train if which == "train" else self.val
        return points[max(points)] if points else None

    def gauges(self) -> list[tuple[str, str, float, float]]:
        """(key, label, used, total) per memory gauge: the worker's RSS against the RAM, then its GPU."""
        d = self.last
        out = []
        if d.get("rss_bytes") and d.get("ram_total_bytes"):
            text = f"RAM {d['rss_bytes'] / GiB:.2f}/{d['ram_total_bytes'] / GiB:.1f} GiB (worker)"
            out.append(("ram", text, float(d["rss_bytes"]), float(d["ram_total_bytes"])))
        for i, g in enumerate(d.get("gpus") or []):  # several GPUs, should the worker report them one day
            if g.get("memory_used") is not None and g.get("memory_total"):
                out.append((f"gpu{i}", f"GPU {g.get('index', i)} {g['memory_used'] / GiB:.1f}/"
                            f"{g['memory_total'] / GiB:.1f} GiB", float(g["memory_used"]), float(g["memory_total"])))
        if not d.get("gpus") and d.get("gpu_memory_used_bytes") is not None and d.get("gpu_memory_total_bytes"):
            used, total = d["gpu_memory_used_bytes"], d["gpu_memory_total_bytes"]
            out.append(("gpu0", f"GPU {used / GiB:.1f}/{total / GiB:.1f} GiB", float(used), float(total)))
        return out


class TrainScreen(Pane):
    BINDINGS = [Binding("s", "stop", "stop"), Binding("u", "resume", "resume")]
    DEFAULT_CSS = """
    TrainScreen #runs { height: auto; min-height: 3; max-height: 25%; }
    TrainScreen #run-bar { height: 1; margin: 0 1; }
    TrainScreen #run-title { width: 1fr; }
    TrainScreen #run-bar Button { margin: 0 0 0 1; min-width: 10; }
    TrainScreen #stats { height: auto; margin: 0 1; }
    TrainScreen #chart { height: 3fr; min-height: 8; }
    TrainScreen #gauges { height: auto; margin: 0 1; }
    TrainScreen .gauge { height: 1; }
    TrainScreen .gauge Label { width: 28; }
    TrainScreen .gauge ProgressBar { width: 1fr; }
    TrainScreen .gauge Bar { width: 1fr; }
    TrainScreen .gauge.warn Bar > .bar--bar { color: $warning; }
    TrainScreen #log { height: 1fr; min-height: 3; max-height: 30%; border-top: solid $accent; padding: 0 1; }
    """

    following: str | None = None

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.runs: dict[str, dict] = {}
        self.view = RunView()
        self.drawn = 0  # redraws so far (the throttle's effect, for the tests)
        self._drawn_at = 0.0
        self._pending: Timer | None = None
        self._gauges: dict[str, tuple[Horizontal, Label, ProgressBar]] = {}

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "state", "step", "loss", "base model")
        yield table
        with Horizontal(id="run-bar"):
            yield Label("select a run (Enter) to follow it", id="run-title")
            yield Button("Stop", id="stop", variant="error", disabled=True, compact=True)
            yield Button("Resume", id="resume", variant="primary", disabled=True, compact=True)
        yield Static("", id="stats")
        yield PlotextPlot(id="chart")
        yield Vertical(id="gauges")
        yield RichLog(id="log", wrap=True, min_width=20, max_lines=1000)

    def on_mount(self) -> None:
        self.draw_chart()
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#runs", DataTable).focus()

    def refresh_data(self) -> None:
        def load():
            from appliance import runs

            return runs.list_runs()

        self.call(load, self.show_runs, group="list")

    def show_runs(self, rs: list[dict]) -> None:
        self.runs = {r["id"]: r for r in rs}
        table = self.query_one("#runs", DataTable)
        table.clear()
        for r in rs:
            step = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
            loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
            table.add_row(r["id"], r["state"], step, loss, r["base_model"], key=r["id"])
        if not rs:
            self.query_one("#run-title", Label).update("no runs yet: start one on Plan (key 5)")
        if self.following is None:  # reattach: a run that is training now is followed without asking
            running = [r["id"] for r in rs if r["state"] == "running"]
            if running:
                self.follow(running[-1])
        if self.following in self.runs:
            table.move_cursor(row=table.get_row_index(self.following))
        self.update_bar()
        if self.following:
            self.changed()  # the ETA shows only while the run is running

    def state(self, run_id: str | None) -> str:
        return self.runs.get(run_id, {}).get("state", "") if run_id else ""

    def update_bar(self) -> None:
        state = self.state(self.following)
        if self.following:
            self.query_one("#run-title", Label).update(f"[b]{escape(self.following)}[/] {state}")
        self.query_one("#stop", Button).disabled = state != "running"
        self.query_one("#resume", Button).disabled = state not in RESUMABLE

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "runs" and event.row_key.value:
            self.follow(event.row_key.value)

    # -- following ---------------------------------------------------------------------------------------------------

    def follow(self, run_id: str) -> None:
        """Show ``run_id`` from the start of its events file, then live until it ends (another run's follower
        is cancelled)."""
        self.following = run_id
        self.view = RunView()
        if self._pending is not None:
            self._pending.stop()
            self._pending = None
        self.query_one("#log", RichLog).clear()
        for key in list(self._gauges):
            self._gauges.pop(key)[0].remove()
        self.update_bar()
        self.redraw()

        def job():
            from appliance import events, runs

            worker = get_current_worker()
            path = runs.run_dir(run_id) / "events.jsonl"
            # The earlier attempts as they are in the file, then the latest attempt live: a failure that a resume
            # went past must not end the following (events.follow stops at the first final event it reads).
            start = events.last_offset(path, attempt_start)
            earlier = events.read(path)
            last = max((i for i, e in enumerate(earlier) if attempt_start(e)), default=0)
            for e in earlier[:last]:
                if worker.is_cancelled:
                    return
                self.post_message(RunEvent(run_id, e, earlier=True))
            for e in events.follow(path, alive=lambda: not worker.is_cancelled and runs.alive(run_id), start=start):
                if worker.is_cancelled:
                    return
                self.post_message(RunEvent(run_id, e))
            self.post_message(FollowEnded(run_id))

        self.run_worker(job, thread=True, exclusive=True, group="follow", exit_on_error=False, name="follow")

    def on_run_event(self, message: RunEvent) -> None:
        if message.run_id != self.following:
            return
        line = self.view.add(message.event)
        if line is not None:
            self.log_line(message.event.t, *line)
        if message.event.type in ("finished", "failed") and not message.earlier and self.following in self.runs:
            self.runs[self.following]["state"] = message.event.type
            self.update_bar()
        self.changed()

    def on_follow_ended(self, message: FollowEnded) -> None:
        if message.run_id == self.following:
            self.redraw()  # whatever the throttle held back
            self.refresh_data()  # its state (finished, failed, interrupted) shows in the list

    def log_line(self, t: float, kind: str, text: str) -> None:
        colour = {"warning": "warning", "oom": "warning", "failed": "error", "finished": "success",
                  "checkpoint": "accent"}.get(kind)
        style = Style(color=self.app.theme_variables[colour]) if colour in self.app.theme_variables else Style()
        at = duration(t - self.view.first_t) if self.view.first_t is not None else ""
        label = {"stage": "", "metric": "", "checkpoint": ""}.get(kind, f"{kind}: ")
        self.query_one("#log", RichLog).write(Text.assemble((f"{at:>7} ", "dim"), (f"{label}{text}", style)))

    # -- drawing (throttled) ---------------------------------------------------------------------------------------

    def changed(self) -> None:
        """Redraw now if the last redraw is old enough, else once when it is (at most 4 redraws a second)."""
        if self._pending is not None:
            return
        wait = self._drawn_at + REDRAW - time.monotonic()
        if wait <= 0:
            self.redraw()
        else:
            self._pending = self.set_timer(wait, self.redraw)

    def redraw(self) -> None:
        if self._pending is not None:
            self._pending.stop()
            self._pending = None
        self._drawn_at = time.monotonic()
        self.drawn += 1
        self.query_one("#stats", Static).update(
            self.view.stats(live=self.state(self.following) == "running") if self.following else "")
        self.draw_chart()
        self.draw_gauges()

    def draw_chart(self) -> None:
        chart = self.query_one("#chart", PlotextPlot)
        plt = chart.plt
        plt.clear_data()
        view = self.view
        colours = self.app.theme_variables

        def rgb(name: str, default: str):
            from textual.color import Color

            try:
                return Color.parse(colours.get(name, default)).rgb
            except Exception:
                return default

        if view.train:
            xs = sorted(view.train)
            plt.plot(xs, [view.train[x] for x in xs], label=f"train {view.latest('train'):.4f}", marker="braille",
                     color=rgb("primary", "blue"))
        if view.val:  # a few points: markers, no line
            xs = sorted(view.val)
            plt.scatter(xs, [view.val[x] for x in xs], label=f"val {view.latest('val'):.4f}", marker="●",
                        color=rgb("warning", "orange"))
        if view.max_steps:
            plt.xlim(0, view.max_steps)
        # The ticks say "step" well enough once there are points; before, the axis says why there are none.
        plt.xlabel("" if view.train or view.val else "no loss logged yet" if self.following else "no run followed")
        chart.refresh()

    def draw_gauges(self) -> None:
        box = self.query_one("#gauges", Vertical)
        for key, text, used, total in self.view.gauges():
            if key not in self._gauges:
                label = Label("")
                bar = ProgressBar(total=total, show_eta=False)
                row = Horizontal(label, bar, classes="gauge")
                self._gauges[key] = (row, label, bar)
                box.mount(row)
            row, label, bar = self._gauges[key]
            label.update(text)
            bar.update(total=total, progress=min(used, total))
            warned = self.view.memory_warning
            row.set_class(bool(warned) and (warned == "RAM") == (key == "ram"), "warn")

    # -- stop and resume -------------------------------------------------------------------------------------------

    def target(self) -> str | None:
        """The run the keys act on: the followed one, else the highlighted row."""
        if self.following:
            return self.following
        table = self.query_one("#runs", DataTable)
        if table.row_count and 0 <= table.cursor_row < table.row_count:
            return str(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        return None

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "stop":
            self.action_stop()
        elif event.button.id == "resume":
            self.action_resume()

    def action_stop(self) -> None:
        run_id = self.target()
        if run_id is None or self.state(run_id) != "running":
            return

        def stop():
            from appliance import runs

            return runs.stop(run_id)

        self.call(stop, lambda stopped: self.notify(f"stopping {run_id}: it saves a checkpoint and stays resumable"
                                                    if stopped else f"run {run_id} is not running"), group="stop")

    def action_resume(self) -> None:
        run_id = self.target()
        if run_id is None or self.state(run_id) not in RESUMABLE:
            return
        self.query_one("#resume", Button).disabled = True  # one press, one worker

        def resume():
            from appliance import events, runs

            require_unlocked()  # the dataset's key and the signing key go to the worker
            path = runs.run_dir(run_id) / "events.jsonl"
            attempts = sum(1 for e in events.read(path) if attempt_start(e))
            pid = runs.resume(run_id)  # a detached worker, as `appliance runs resume --detach` starts
            # Follow once the new attempt has said it started: following sooner would end at a failure that the
            # resume goes past (following stops at the first final event it reads).
            deadline, worker = time.monotonic() + 120, get_current_worker()
            while time.monotonic() < deadline and not worker.is_cancelled and runs.alive(run_id):
                if sum(1 for e in events.read(path) if attempt_start(e)) > attempts:
                    break
                time.sleep(0.2)
            return pid

        def resumed(pid: int) -> None:
            self.notify(f"resumed {run_id} (pid {pid})")
            self.runs.setdefault(run_id, {})["state"] = "running"
            self.follow(run_id)
            self.refresh_data()

        self.query_one("#run-title", Label).update(f"[b]{escape(run_id)}[/] resuming…")
        self.call(resume, resumed, group="resume")

    def on_worker_state_changed(self, event) -> None:
        from textual.worker import WorkerState

        if event.worker.group == "resume" and event.state == WorkerState.ERROR:
            self.update_bar()  # the button comes back (Pane shows the dialog)
