"""Doctor: the air-gap, environment, vault and hardware checks of `appliance doctor`, as a table; and the
machines of a training cluster declared or revoked (`appliance cluster allow|revoke`), which its air-gap section
lists."""

from __future__ import annotations

from typing import Any, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Input, Static

from .base import Pane

STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": ""}


def default_sections(simulate: str | None) -> Callable[[], list]:
    def sections() -> list[tuple[str, list[dict]]]:
        from appliance import doctor, hardware

        return doctor.sections(hardware.detect(simulate, check_bitsandbytes=False))
    return sections


def value_text(c: dict) -> str:
    v = c["value"]
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


class DoctorScreen(Pane):
    BINDINGS = [Binding("c", "toggle_cluster", "cluster peers")]
    DEFAULT_CSS = """
    DoctorScreen #verdict { height: auto; margin: 0 1; }
    DoctorScreen DataTable { height: 1fr; }
    DoctorScreen #cluster-form { height: auto; display: none; }
    DoctorScreen #cluster-form.shown { display: block; }
    DoctorScreen #peer-entries { width: 1fr; }
    DoctorScreen #cluster-form Button { width: auto; min-width: 10; }
    """

    def __init__(self, simulate: str | None = None, sections: Callable[[], list] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.sections = sections or default_sections(simulate)

    def compose(self) -> ComposeResult:
        yield Static("running the checks…", id="verdict")
        table: DataTable = DataTable(id="checks", cursor_type="row", zebra_stripes=True)
        table.add_columns("section", "status", "check", "value", "detail")
        yield table
        with Horizontal(id="cluster-form"):
            yield Input(placeholder="machines of a training cluster: HOST[:PORT] ... (numeric addresses)",
                        id="peer-entries")
            yield Button("Allow", id="peer-allow", variant="warning")
            yield Button("Revoke", id="peer-revoke")

    def on_mount(self) -> None:
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one(DataTable).focus()  # the table takes the focus, so `c` (cluster peers) works at once

    def refresh_data(self) -> None:
        self.call(self.sections, self.show, group="doctor")

    def show(self, sections: list[tuple[str, list[dict]]]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        failed = warned = 0
        for name, checks in sections:
            for c in checks:
                failed += c["status"] == "fail"
                warned += c["status"] == "warn"
                table.add_row(name, Text(c["status"], style=STYLES[c["status"]]), c["label"], value_text(c),
                              c["detail"] or "")
        warnings = f"{warned} warning{'s' if warned != 1 else ''}"
        verdict = (f"[red b]{failed} failed[/], {warnings}" if failed
                   else warnings if warned else "[green]all checks passed[/]")
        self.query_one("#verdict", Static).update(verdict)

    # -- cluster peers: the only addresses a training run across machines may reach --------------------------

    def action_toggle_cluster(self) -> None:
        form = self.query_one("#cluster-form")
        form.toggle_class("shown")
        if form.has_class("shown"):
            self.query_one("#peer-entries", Input).focus()
        else:
            self.query_one(DataTable).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "peer-entries":
            self.change_peers("allow")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id in ("peer-allow", "peer-revoke"):
            self.change_peers(event.button.id.removeprefix("peer-"))

    def change_peers(self, how: str) -> None:
        """Declare the typed machines (allow), or forget each (revoke); audited as the CLI does; the table then
        shows the new list."""
        from appliance.errors import InvalidInput

        entries = self.query_one("#peer-entries", Input).value.split()
        if not entries:
            raise InvalidInput("Doctor: type the machines' addresses, HOST or HOST:PORT, separated by spaces.")

        def job() -> list[dict]:
            from appliance import cluster

            if how == "allow":
                return cluster.allow(entries)
            for entry in entries:
                listed = cluster.revoke(entry)
            return listed

        def done(listed: list[dict]) -> None:
            from appliance import cluster

            self.peers = listed
            self.query_one("#peer-entries", Input).value = ""
            self.notify(f"{'declared' if how == 'allow' else 'revoked'} {', '.join(entries)}; the cluster is now "
                        + (", ".join(cluster.show(p["address"], p.get("port")) for p in listed) or "empty"))
            self.refresh_data()

        self.call(job, done, group="cluster")
