"""Audit: the tamper-evident log, filtered by event, and a check of its hash chain and signed checkpoints."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Input, Static

from .base import Pane


def verify() -> tuple[bool, str]:
    """``audit.verify``: (True, a summary) or (False, the one-sentence failure); either is recorded in the log."""
    from appliance import audit
    from appliance.errors import CheckFailed

    try:
        r = audit.verify()
    except CheckFailed as e:
        return False, str(e)
    text = f"audit log intact: {r['entries']} entries, signed through entry {r['signed_through']}"
    if r["unsigned_tail"]:
        text += f"; the last {r['unsigned_tail']} entries are not signed yet"
    return True, text


def _pairs(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


class AuditScreen(Pane):
    DEFAULT_CSS = """
    AuditScreen #bar { height: auto; }
    AuditScreen #filter { width: 1fr; }
    AuditScreen #result { height: auto; margin: 0 1; }
    AuditScreen DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="bar"):
            yield Input(placeholder="filter by event: dataset, train.start, network.blocked…", id="filter")
            yield Button("Verify", id="verify", variant="primary")
        yield Static("", id="result")
        table: DataTable = DataTable(id="entries", cursor_type="row", zebra_stripes=True)
        table.add_columns("seq", "time (UTC)", "user", "event", "subjects", "details")
        yield table

    def on_mount(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        event = self.query_one("#filter", Input).value.strip() or None

        def load():
            from appliance import audit

            return audit.entries(event=event)

        self.call(load, self.show, group="entries")

    def show(self, entries: list[dict]) -> None:
        self.entries = entries
        table = self.query_one(DataTable)
        table.clear()
        for e in entries:
            table.add_row(str(e["seq"]), str(e["time"])[:19].replace("T", " "), e["user"], e["event"],
                          _pairs(e["subjects"]), _pairs(e["details"])[:80])

    def on_input_changed(self, event: Input.Changed) -> None:
        self.refresh_data()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "verify":
            self.query_one("#result", Static).update("verifying…")
            self.call(verify, self.show_verdict, group="verify")

    def show_verdict(self, verdict: tuple[bool, str]) -> None:
        ok, text = verdict
        self.verdict = verdict
        self.query_one("#result", Static).update(f"[green]✓ {escape(text)}[/]" if ok else f"[red b]✗ {escape(text)}[/]")
        self.refresh_data()  # verifying is itself recorded
