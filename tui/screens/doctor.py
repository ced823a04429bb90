"""Doctor: the air-gap, environment, vault and hardware checks of `appliance doctor`, as a table."""

from __future__ import annotations

from typing import Any, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

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
    DEFAULT_CSS = """
    DoctorScreen #verdict { height: auto; margin: 0 1; }
    DoctorScreen DataTable { height: 1fr; }
    """

    def __init__(self, simulate: str | None = None, sections: Callable[[], list] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.sections = sections or default_sections(simulate)

    def compose(self) -> ComposeResult:
        yield Static("running the checks…", id="verdict")
        table: DataTable = DataTable(id="checks", cursor_type="row", zebra_stripes=True)
        table.add_columns("section", "status", "check", "value", "detail")
        yield table

    def on_mount(self) -> None:
        self.refresh_data()

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
