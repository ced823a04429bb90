"""Train: the runs, and one run followed live from its events file (a run started from the CLI reattaches here).

Following never starts or owns the run: the training worker is its own process, so closing the TUI leaves it
training, and reopening follows it again from the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Label, Sparkline, Static
from textual.worker import get_current_worker

from .base import Pane

GiB = 2**30


@dataclass
class RunEvent(Message):
    """One event of the followed run, posted from the follower thread."""

    run_id: str
    event: object  # appliance.events.Event


@dataclass
class FollowEnded(Message):
    run_id: str


def stats_text(d: dict, eval_loss: float | None) -> str:
    parts = [f"step {d.get('step', 0)}/{d['max_steps']}" if d.get("max_steps") else f"step {d.get('step', 0)}"]
    if "loss" in d:
        parts.append(f"loss {d['loss']:.4f}")
    if eval_loss is not None:
        parts.append(f"val {eval_loss:.4f}")
    if "tokens_per_s" in d:
        parts.append(f"{d['tokens_per_s']:.0f} tok/s")
    if d.get("gpu_memory_used_bytes") and d.get("gpu_memory_total_bytes"):
        parts.append(f"GPU {d['gpu_memory_used_bytes'] / GiB:.1f}/{d['gpu_memory_total_bytes'] / GiB:.1f} GiB")
    if "rss_bytes" in d:
        parts.append(f"rss {d['rss_bytes'] / GiB:.2f} GiB")
    return "  ·  ".join(parts)


class TrainScreen(Pane):
    DEFAULT_CSS = """
    TrainScreen #runs { height: 1fr; min-height: 4; }
    TrainScreen #detail { height: auto; border-top: solid $accent; padding: 0 1; }
    TrainScreen #loss { height: 4; margin: 0 0 1 0; }
    TrainScreen #run-bar { height: auto; }
    TrainScreen #run-title { width: 1fr; }
    TrainScreen #stats, TrainScreen #last { height: auto; }
    """

    following: str | None = None

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "state", "step", "loss", "base model")
        yield table
        with Vertical(id="detail"):
            with Horizontal(id="run-bar"):
                yield Label("select a run (Enter) to follow it", id="run-title")
                yield Button("Stop", id="stop", variant="error", disabled=True)
            yield Label("loss", id="loss-label")
            yield Sparkline([], id="loss")
            yield Static("", id="stats")
            yield Static("", id="last")

    def on_mount(self) -> None:
        self.refresh_data()

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
            self.query_one("#run-title", Label).update("no runs yet: `appliance train RECIPE` starts one")
        if self.following is None:  # reattach: a run that is training now is followed without asking
            running = [r["id"] for r in rs if r["state"] == "running"]
            if running:
                self.follow(running[-1])
        self.query_one("#stop", Button).disabled = not (
            self.following and self.runs.get(self.following, {}).get("state") == "running")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "runs" and event.row_key.value:
            self.follow(event.row_key.value)

    def follow(self, run_id: str) -> None:
        self.following = run_id
        self.losses: list[float] = []
        self.eval_loss: float | None = None
        self.last_progress: dict = {}
        state = getattr(self, "runs", {}).get(run_id, {}).get("state", "")
        self.query_one("#run-title", Label).update(f"[b]{escape(run_id)}[/] {state}")
        self.query_one("#loss", Sparkline).data = []
        self.query_one("#stats", Static).update("")
        self.query_one("#last", Static).update("")
        self.query_one("#stop", Button).disabled = state != "running"

        def job():
            from appliance import events, runs

            worker = get_current_worker()
            path = runs.run_dir(run_id) / "events.jsonl"
            # From the start of the file, so the chart shows the whole run; stops when the run ends, when it is
            # no longer alive, or when another run is selected (this worker is cancelled).
            for e in events.follow(path, alive=lambda: not worker.is_cancelled and runs.alive(run_id)):
                if worker.is_cancelled:
                    return
                self.post_message(RunEvent(run_id, e))
            self.post_message(FollowEnded(run_id))

        self.run_worker(job, thread=True, exclusive=True, group="follow", exit_on_error=False, name="follow")

    def on_run_event(self, message: RunEvent) -> None:
        if message.run_id != self.following:
            return
        e = message.event
        if e.type == "progress":
            self.last_progress = e.data
            if isinstance(e.data.get("loss"), (int, float)):
                self.losses.append(float(e.data["loss"]))
                self.query_one("#loss", Sparkline).data = list(self.losses)
                self.query_one("#loss-label", Label).update(
                    f"loss: {len(self.losses)} points, first {self.losses[0]:.4f}, lowest {min(self.losses):.4f}")
            self.query_one("#stats", Static).update(stats_text(e.data, self.eval_loss))
        elif e.type == "metric" and "eval_loss" in e.data:
            self.eval_loss = float(e.data["eval_loss"])
            if self.last_progress:
                self.query_one("#stats", Static).update(stats_text(self.last_progress, self.eval_loss))
        elif e.type in ("stage", "warning", "failed", "finished") and e.message:
            style = {"warning": "yellow", "failed": "red"}.get(e.type, "")
            text = escape(f"{e.type}: {e.message}")
            self.query_one("#last", Static).update(f"[{style}]{text}[/]" if style else text)

    def on_follow_ended(self, message: FollowEnded) -> None:
        if message.run_id == self.following:
            self.refresh_data()  # its state (finished, failed, interrupted) shows in the list

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "stop" and self.following:
            run_id = self.following

            def stop():
                from appliance import runs

                return runs.stop(run_id)

            self.call(stop, lambda stopped: self.notify(f"stopping {run_id}: it stays resumable" if stopped
                                                        else f"run {run_id} is not running"), group="stop")
