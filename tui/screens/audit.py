"""Audit: the tamper-evident log, filtered by event and by time, a check of its hash chain and signed checkpoints,
and the period's report (`appliance audit report`) shown as Markdown and saved as Markdown or HTML."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Markdown, Static

from .base import Pane


def verify(public: bytes | None = None) -> tuple[bool, str]:
    """``audit.verify``, against ``public`` (a trusted copy of the signing key, `audit verify --pubkey`) or the
    keyring's key: (True, a summary) or (False, the one-sentence failure); either is recorded in the log."""
    from appliance.trust import audit
    from appliance.errors import CheckFailed

    try:
        r = audit.verify(public)
    except CheckFailed as e:
        return False, str(e)
    text = f"audit log intact: {r['entries']} entries, signed through entry {r['signed_through']}"
    if r["unsigned_tail"]:
        text += f"; the last {r['unsigned_tail']} entries are not signed yet"
    return True, text


def check_time(field: str, value: str) -> str | None:
    """``value`` (an ISO time or a span back from now) checked by ``audit.parse_since``; None if empty. A bad one
    is the library's sentence, led by the field's name."""
    from appliance.trust import audit
    from appliance.errors import InvalidInput

    if not value.strip():
        return None
    try:
        audit.parse_since(value)
    except InvalidInput as e:
        raise InvalidInput(f"{field}: {e}") from None
    return value.strip()


def report_text(since: str, until: str, fmt: str = "md") -> str:
    from appliance.trust import audit

    return audit.report(since=check_time("since", since), until=check_time("until", until), fmt=fmt)


def save_report(path: str, since: str, until: str) -> tuple[Path, str]:
    """Write the report to ``path``, a new file (HTML for .html/.htm, else Markdown), whole or not at all."""
    from appliance.trust import audit
    from appliance.errors import InvalidInput

    if not path.strip():
        raise InvalidInput("report file: name the file to write, e.g. ~/audit-report.md or ~/audit-report.html.")
    out = Path(path.strip()).expanduser()
    fmt = "html" if out.suffix.lower() in (".html", ".htm") else "md"
    return audit.write_report(out, check_time("since", since), check_time("until", until), fmt), fmt


def _pairs(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


class ReportDialog(ModalScreen[None]):
    """The period's report as Markdown, and a field to save it (Markdown or HTML by the file's suffix)."""

    BINDINGS = [Binding("escape", "close", "close")]
    DEFAULT_CSS = """
    ReportDialog { align: center middle; }
    ReportDialog > Vertical { width: 95%; max-width: 140; height: 95%; border: thick $accent; background: $surface;
                              padding: 0 1; }
    ReportDialog .row { height: auto; }
    ReportDialog #r-since, ReportDialog #r-until { width: 1fr; }
    ReportDialog #r-view { height: 1fr; border: round $primary; }
    ReportDialog #r-path { width: 1fr; }
    ReportDialog Button { width: auto; min-width: 8; margin: 0 0 0 1; }
    ReportDialog #r-status { height: auto; }
    """

    def __init__(self, since: str = "") -> None:
        super().__init__()
        self.since = since
        self.text = ""
        self.saved: Path | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            with Horizontal(classes="row"):
                yield Input(self.since, placeholder="since: 2026-11-22, 12h, 7d (empty: the beginning)", id="r-since")
                yield Input(placeholder="until (empty: now)", id="r-until")
            with VerticalScroll(id="r-view"):
                yield Markdown("making the report…", id="r-markdown")
            with Horizontal(classes="row"):
                yield Input(placeholder="save as a new file: .md (Markdown) or .html", id="r-path")
                yield Button("Save", id="r-save", variant="primary")
                yield Button("Close", id="r-close")
            yield Label("", id="r-status")

    def on_mount(self) -> None:
        self.make()
        self.query_one("#r-path", Input).focus()

    def _run(self, fn, done, group: str) -> None:
        """A library call in a thread; its failure is the app's error dialog, over this one."""
        def job():
            try:
                result = fn()
            except Exception as error:
                self.app.call_from_thread(self.app.show_error, error)
                return
            self.app.call_from_thread(done, result)

        self.run_worker(job, thread=True, exclusive=True, group=group, exit_on_error=False)

    def make(self) -> None:
        since, until = self.query_one("#r-since", Input).value, self.query_one("#r-until", Input).value
        self._run(lambda: report_text(since, until), self.show, "report")

    async def show(self, text: str) -> None:
        self.text = text
        await self.query_one("#r-markdown", Markdown).update(text)

    def save(self) -> None:
        path = self.query_one("#r-path", Input).value
        since, until = self.query_one("#r-since", Input).value, self.query_one("#r-until", Input).value
        self._run(lambda: save_report(path, since, until), self.saved_to, "save")

    def saved_to(self, result: tuple[Path, str]) -> None:
        out, fmt = result
        self.saved = out
        self.query_one("#r-path", Input).value = ""
        self.query_one("#r-status", Label).update(f"wrote the report ({'HTML' if fmt == 'html' else 'Markdown'}) "
                                                  f"to {escape(str(out))}")
        self.app.notify(f"wrote {out}")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "r-path":
            self.save()
        else:
            self.make()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "r-save":
            self.save()
        elif event.button.id == "r-close":
            self.dismiss()

    def action_close(self) -> None:
        self.dismiss()


class AuditScreen(Pane):
    BINDINGS = [Binding("v", "verify", "verify"), Binding("p", "report", "report")]
    DEFAULT_CSS = """
    AuditScreen #bar { height: auto; }
    AuditScreen #filter { width: 1fr; }
    AuditScreen #since { width: 2fr; max-width: 30; }
    AuditScreen #since.bad { border: tall $error; }
    AuditScreen #pubkey { width: 1fr; max-width: 40; }
    AuditScreen #bar Button { width: auto; min-width: 10; }
    AuditScreen #result { height: auto; margin: 0 1; }
    AuditScreen DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="bar"):
            yield Input(placeholder="event: dataset, train.start, network.blocked…", id="filter")
            yield Input(placeholder="since: 2026-11-22, 30m, 12h, 7d", id="since")
            yield Input(placeholder="trusted key: a .pub copy", id="pubkey",
                        tooltip="verify against a pinned copy of signing-key.pub (default: the keyring's own)")
            yield Button("Verify", id="verify", variant="primary")
            yield Button("Report", id="report")
        yield Static("", id="result")
        table: DataTable = DataTable(id="entries", cursor_type="row", zebra_stripes=True)
        table.add_columns("seq", "time (UTC)", "user", "event", "subjects", "details")
        yield table

    def on_mount(self) -> None:
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#entries", DataTable).focus()

    def refresh_data(self, strict: bool = True) -> None:
        """Re-read the log with the filters. A time that does not parse is the dialog when asked for (Enter, the
        `r` key), and only marks the field while it is being typed."""
        event = self.query_one("#filter", Input).value.strip() or None
        since = self.query_one("#since", Input).value

        def load():
            from appliance.trust import audit
            from appliance.errors import InvalidInput

            try:
                start = check_time("since", since)
            except InvalidInput:
                if strict:
                    raise
                return None
            return audit.entries(since=start, event=event)

        self.call(load, self.show, group="entries")

    def show(self, entries: list[dict] | None) -> None:
        self.query_one("#since", Input).set_class(entries is None, "bad")
        if entries is None:
            return
        self.entries = entries
        table = self.query_one(DataTable)
        table.clear()
        for e in entries:
            table.add_row(str(e["seq"]), str(e["time"])[:19].replace("T", " "), e["user"], e["event"],
                          _pairs(e["subjects"]), _pairs(e["details"])[:80])

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "pubkey":
            self.refresh_data(strict=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "pubkey":
            self.action_verify()
        else:
            self.refresh_data()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "verify":
            self.action_verify()
        elif event.button.id == "report":
            self.action_report()

    def action_verify(self) -> None:
        from appliance.trust import signing

        pubkey = self.query_one("#pubkey", Input).value.strip()
        public = signing.load_public(Path(pubkey).expanduser()) if pubkey else None  # a bad file: the dialog
        self.query_one("#result", Static).update("verifying…")
        self.call(lambda: verify(public), self.show_verdict, group="verify")

    def action_report(self) -> None:
        self.app.push_screen(ReportDialog(self.query_one("#since", Input).value.strip()))

    def show_verdict(self, verdict: tuple[bool, str]) -> None:
        ok, text = verdict
        self.verdict = verdict
        self.query_one("#result", Static).update(f"[$success]✓ {escape(text)}[/]" if ok
                                                 else f"[$error b]✗ {escape(text)}[/]")
        self.refresh_data()  # verifying is itself recorded
