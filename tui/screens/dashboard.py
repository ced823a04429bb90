"""Dashboard: what the workspace holds, and the next step of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Static

from .base import Pane


@dataclass(frozen=True)
class Summary:
    vault: bool
    models: int
    datasets: int
    runs: int
    running: list[str]
    finished: list[str]
    exported: list[str]
    audit_entries: int
    guard: bool = True  # the egress guard is installed in this process


def summarize() -> Summary:
    """Read the workspace through the public API (runs in a worker: it touches the disk and every run's pid)."""
    from appliance import models, runs
    from appliance.trust import audit, egress
    from appliance.trust import keyring

    vault = keyring.exists()
    rs = runs.list_runs()
    from pathlib import Path

    return Summary(
        vault=vault,
        models=len(models.list_models()),
        datasets=len(keyring.status()["datasets"]) if vault else 0,
        runs=len(rs),
        running=[r["id"] for r in rs if r["state"] == "running"],
        finished=[r["id"] for r in rs if r["state"] == "finished"],
        exported=[r["id"] for r in rs if r["state"] == "finished" and (Path(r["path"]) / "export.json").is_file()],
        audit_entries=len(audit.entries()),
        guard=egress.installed(),
    )


def next_step(s: Summary) -> tuple[str, str]:
    """The one thing to do next (the pipeline in order): what to do, and the tab that does it."""
    if not s.vault:
        return "no vault yet: create one on the Data screen (key 4), or with `appliance vault init`", "datasets"
    if not s.models:
        return ("import a model (a .gguf file, a Hugging Face folder, or the embedded SmolLM2-135M-Instruct) on the "
                "Models screen (key 3), or with `appliance models import PATH`", "models")
    if not s.datasets:
        return ("import a dataset (a JSONL, JSON or CSV file, or the demo dataset) on the Data screen (key 4), or "
                "with `appliance data import FILE --name NAME`", "datasets")
    if s.running:
        return f"a run is training: follow {s.running[-1]} on the Train screen (key 6)", "train"
    if not s.finished:
        return ("plan and train on the Plan screen (key 5), or with `appliance plan RECIPE`, then "
                "`appliance train RECIPE`", "plan")
    if not s.exported:
        run = s.finished[-1]
        return (f"evaluate {run} against its base (key 7), and export it to GGUF on the Export screen (key 8), or "
                f"with `appliance export {run}`", "export")
    return (f"chat with the tuned model, side by side with its base, on the Chat screen (key 9), or with "
            f"`appliance chat {s.exported[-1]}`", "chat")


def render(s: Summary) -> str:
    def mark(done: bool) -> str:
        return "[green]✓[/]" if done else "[dim]·[/]"

    steps = [
        (s.vault, "vault", "present" if s.vault else "none"),
        (s.models > 0, "models", str(s.models)),
        (s.datasets > 0, "datasets", f"{s.datasets} in the vault"),
        (bool(s.finished), "runs", f"{s.runs} ({len(s.finished)} finished, {len(s.running)} running)"),
        (bool(s.exported), "exported", f"{len(s.exported)} run(s) with GGUF files"),
    ]
    lines = [f" {mark(done)} {name:<9} {value}" for done, name, value in steps]
    lines.append(f"   {'audit':<9} {s.audit_entries} entries (key 0)")
    lines.append(f"   {'air-gap':<9} " + ("egress guard active: no connection leaves this machine (key g)" if s.guard
                                          else "[red]egress guard NOT active[/] (key g)"))
    return "\n".join(lines)


class Dashboard(Pane):
    DEFAULT_CSS = """
    Dashboard #pipeline { height: auto; margin: 1 1; }
    Dashboard #next-box { height: auto; margin: 0 1; padding: 0 1; border: round $accent; }
    Dashboard #next { width: 1fr; height: auto; padding: 1 1; }
    Dashboard #go { min-width: 8; width: auto; margin: 1 0 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static("reading the workspace…", id="pipeline")
        with Horizontal(id="next-box"):
            yield Static("", id="next")
            yield Button("Go", id="go", variant="primary", disabled=True)

    def focus_default(self) -> None:
        self.query_one("#go", Button).focus()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "go" and getattr(self, "summary", None) is not None:
            await self.app.action_show(next_step(self.summary)[1])

    def on_mount(self) -> None:
        # After the first paint: the worker's imports (the appliance's modules) would hold the GIL during it.
        self.call_after_refresh(self.refresh_data)

    def refresh_data(self) -> None:
        self.call(summarize, self.show, group="summary")

    def show(self, s: Summary) -> None:
        self.summary = s
        self.query_one("#pipeline", Static).update(render(s))
        what, tab = next_step(s)
        self.query_one("#next", Static).update(f"[b]next:[/] {escape(what)}")
        go = self.query_one("#go", Button)
        go.disabled = False
        go.tooltip = f"show the {tab} screen"
        from textual.widgets import TabbedContent, Tabs

        # As the app starts, Enter goes; but never pull the focus (and with it the tab) to Home from another screen,
        # nor when the user has asked for one that is still being built.
        home = self.app.query_one(TabbedContent).active == "dashboard" and self.app.asked_tab in (None, "dashboard")
        if home and (self.app.focused is None or isinstance(self.app.focused, Tabs)):
            go.focus()
