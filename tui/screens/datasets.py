"""Datasets: the vault. Create it or unlock it (the passphrase is never shown, kept or logged), then import,
browse, export (plaintext, after a confirmation) and crypto-shred the encrypted datasets; authenticate every
dataset file (`vault verify`) and change the passphrase (`vault rekey`); ``x`` imports the demo dataset.

The import runs in a thread; the importer's events reach the UI thread through ``call_from_thread`` and feed a
progress bar, then its report (rejections per reason, with examples) shows in a panel.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, ContentSwitcher, DataTable, Input, Label, ProgressBar, Select, Static

from .base import Pane, unlocked

BROWSE = 20  # records shown by Browse
HINT = ("i import · x the demo dataset · b browse the selected dataset · e export it in plaintext · d delete it · "
        "v verify every dataset · k change the passphrase · l lock the vault")


def vault_state() -> str:
    from appliance.trust import keyring

    if not keyring.exists():
        return "none"
    return "open" if unlocked() else "locked"


def list_datasets() -> list[dict]:
    """The vault's datasets, as `appliance data list` reads them (their manifests)."""
    from appliance.trust import manifest
    from appliance.workspace import folder

    rows = []
    for p in sorted(folder("datasets").iterdir()):
        if (p / manifest.NAME).is_file():
            d = manifest.read(p)["details"]
            rec = d.get("records") or {}
            rows.append({"id": p.name, "train": rec.get("train", 0), "validation": rec.get("validation", 0),
                         "test": rec.get("test", 0), "source": d.get("source") or "-", "format": d.get("record_format") or "-"})
    return rows


def records_text(name: str, records: list[dict]) -> str:
    out = []
    for i, r in enumerate(records):
        out.append(f"[b]--- {escape(name)} train #{i}[/]")
        for m in r.get("messages", []):
            out.append(f"[dim]\\[{escape(m['role'])}][/] {escape(str(m['content']))}")
        if "chosen" in r:
            for m in r.get("prompt", []):
                out.append(f"[dim]\\[{escape(m['role'])}][/] {escape(str(m['content']))}")
            out.append(f"[green]\\[chosen][/] {escape(str(r['chosen']))}")
            out.append(f"[red]\\[rejected][/] {escape(str(r['rejected']))}")
    return "\n".join(out) or "(no records)"


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question; only the explicit button (or `y`) says yes."""

    BINDINGS = [Binding("escape", "no", "cancel"), Binding("n", "no", "no", show=False),
                Binding("y", "yes", "yes", show=False)]
    DEFAULT_CSS = """
    ConfirmDialog { align: center middle; }
    ConfirmDialog > Vertical { width: 70; max-width: 90%; height: auto; border: thick $warning; padding: 1 2;
                               background: $surface; }
    ConfirmDialog #question { margin: 0 0 1 0; }
    ConfirmDialog Horizontal { height: auto; }
    ConfirmDialog Button { margin: 0 1 0 0; }
    """

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question", markup=False)
            with Horizontal():
                yield Button(self.yes, id="yes", variant="error")
                yield Button("Cancel", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # Enter on the dialog as it opens cancels

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


class DatasetsScreen(Pane):
    BINDINGS = [Binding("i", "toggle_import", "import"), Binding("b", "browse", "browse"),
                Binding("e", "toggle_export", "export"), Binding("d", "delete", "delete"),
                Binding("v", "verify", "verify every dataset file", show=False),
                Binding("k", "toggle_rekey", "change the passphrase (rekey)", show=False),
                Binding("p", "toggle_package", "package for another machine", show=False),
                Binding("l", "lock", "lock", show=False),
                Binding("x", "import_demo", "import the demo datasets (demo-records, demo-preferences)", show=False)]
    FORMS = ("#ds-import", "#ds-export", "#ds-rekey", "#ds-package")  # one shown at a time, under the table
    DEFAULT_CSS = """
    DatasetsScreen ContentSwitcher { height: 1fr; }
    DatasetsScreen .form { height: auto; padding: 1 2; }
    DatasetsScreen .form Input { width: 60; max-width: 100%; }
    DatasetsScreen .form Button { margin: 1 0 0 0; }
    DatasetsScreen #open { height: 1fr; }
    DatasetsScreen #dataset-table { height: 1fr; min-height: 4; }
    DatasetsScreen #ds-import, DatasetsScreen #ds-export, DatasetsScreen #ds-rekey, DatasetsScreen #ds-package {
        height: auto; display: none; }
    DatasetsScreen #ds-import.shown, DatasetsScreen #ds-export.shown, DatasetsScreen #ds-rekey.shown,
    DatasetsScreen #ds-package.shown { display: block; }
    DatasetsScreen #ds-package Input { width: 1fr; }
    DatasetsScreen #ds-pkg-out { width: 2fr; }
    DatasetsScreen #ds-pkg-go { width: auto; min-width: 10; }
    DatasetsScreen #ds-pkg-open { width: 18; display: none; }
    DatasetsScreen #ds-pkg-open.shown { display: block; }
    DatasetsScreen #ds-export-path { width: 1fr; }
    DatasetsScreen #ds-export-split { width: 18; }
    DatasetsScreen #ds-rekey Input { width: 1fr; }
    DatasetsScreen #ds-rekey-kdf { width: 18; }
    DatasetsScreen #rk-go { width: auto; min-width: 10; }
    DatasetsScreen #ds-path { width: 2fr; }
    DatasetsScreen #ds-name { width: 1fr; }
    DatasetsScreen #ds-split { width: 14; }
    DatasetsScreen #ds-format { width: 18; }
    DatasetsScreen #ds-progress-row { height: auto; display: none; }
    DatasetsScreen #ds-progress-row.shown { display: block; }
    DatasetsScreen #ds-progress-label { width: auto; padding: 0 1; }
    DatasetsScreen #ds-view { height: 1fr; min-height: 3; border-top: solid $accent; }
    DatasetsScreen #ds-output { height: auto; padding: 0 1; }
    """

    state: str = "unknown"

    def __init__(self, kdf: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.kdf = kdf
        self.rows: list[dict] = []
        self.report: dict | None = None
        self.browsed: list[dict] = []

    def compose(self) -> ComposeResult:
        from appliance.importer.formats import FORMATS
        from appliance.trust.keyring import KDFS

        with ContentSwitcher(initial="loading"):
            yield Static("reading the vault…", id="loading")
            with Vertical(id="create", classes="form"):
                yield Static("[b]no vault yet.[/] Choose a passphrase for it (it is never shown or stored; "
                            "without it the datasets cannot be read):")
                yield Input(password=True, placeholder="passphrase", id="new-pass")
                yield Input(password=True, placeholder="the same passphrase again", id="new-pass2")
                yield Button("Create the vault", id="create-go", variant="primary")
            with Vertical(id="unlock", classes="form"):
                yield Static("[b]the vault is locked.[/] Its passphrase opens it for this session:")
                yield Input(password=True, placeholder="passphrase", id="pass")
                yield Button("Unlock", id="unlock-go", variant="primary")
            with Vertical(id="open"):
                table: DataTable = DataTable(id="dataset-table", cursor_type="row", zebra_stripes=True)
                table.add_columns("id", "train", "validation", "test", "format", "source")
                yield table
                with Horizontal(id="ds-import"):
                    yield Input(placeholder="file (JSONL, JSON, CSV, Parquet)", id="ds-path")
                    yield Input(placeholder="name", id="ds-name")
                    yield Input(value="80/10/10", placeholder="train/val/test", id="ds-split",
                                tooltip="train / validation / test shares; test serves only the final evaluation")
                    yield Select([(f, f) for f in ("auto", *FORMATS)], value="auto", allow_blank=False,
                                 id="ds-format")
                    yield Input(password=True, placeholder="package pass", id="ds-pkg-open",
                                tooltip="a dataset package's passphrase (a package folder keeps its own name)")
                    yield Button("Import", id="ds-go", variant="primary")
                with Horizontal(id="ds-export"):
                    yield Input(placeholder="plaintext to a new file (JSON Lines)", id="ds-export-path")
                    yield Select([("all splits", "all"), ("train", "train"), ("validation", "validation"),
                             ("test", "test")], value="all", allow_blank=False, id="ds-export-split")
                    yield Button("Export", id="ds-export-go", variant="warning")
                with Horizontal(id="ds-package"):
                    yield Input(placeholder="package folder for another machine (new)", id="ds-pkg-out")
                    yield Input(password=True, placeholder="package passphrase", id="ds-pkg-pass")
                    yield Input(password=True, placeholder="again", id="ds-pkg-pass2")
                    yield Button("Package", id="ds-pkg-go", variant="primary")
                with Horizontal(id="ds-rekey"):
                    yield Input(password=True, placeholder="current", id="rk-old")
                    yield Input(password=True, placeholder="new", id="rk-new")
                    yield Input(password=True, placeholder="new again", id="rk-new2")
                    yield Select([("same KDF", "same"), *[(k, k) for k in KDFS]], value="same", allow_blank=False,
                                 id="ds-rekey-kdf")
                    yield Button("Change", id="rk-go", variant="primary")
                with Horizontal(id="ds-progress-row"):
                    yield Label("", id="ds-progress-label")
                    yield ProgressBar(id="ds-progress", show_eta=False)
                with VerticalScroll(id="ds-view"):
                    yield Static(HINT, id="ds-output")

    def on_mount(self) -> None:
        self.refresh_data()

    def focus_default(self) -> None:
        target = {"none": "#new-pass", "locked": "#pass"}.get(self.state, "#dataset-table")
        self.query_one(target).focus()

    def refresh_data(self) -> None:
        self.call(vault_state, self.show_state, group="state")

    def show_state(self, state: str) -> None:
        self.state = state
        self.query_one(ContentSwitcher).current = {"none": "create", "locked": "unlock", "open": "open"}[state]
        if state == "none":
            self.query_one("#new-pass", Input).focus()
        elif state == "locked":
            self.query_one("#pass", Input).focus()
        else:
            self.query_one("#dataset-table", DataTable).focus()
            self.call(list_datasets, self.show_datasets, group="list")

    def show_datasets(self, rows: list[dict]) -> None:
        self.rows = rows
        table = self.query_one("#dataset-table", DataTable)
        table.clear()
        for r in rows:
            table.add_row(r["id"], str(r["train"]), str(r["validation"]), str(r["test"]), r["format"], r["source"],
                          key=r["id"])
        if not rows and self.report is None:
            self.query_one("#ds-output", Static).update(
                "no datasets yet: press [b]i[/] to import a file, or [b]x[/] for the demo dataset (records to turn "
                "into JSON, what `appliance demo` trains on)")

    def selected(self) -> str | None:
        table = self.query_one("#dataset-table", DataTable)
        if not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]["id"]

    # -- create and unlock -----------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        handlers = {"new-pass": self.create, "new-pass2": self.create, "pass": self.unlock,
                    "ds-path": self.start_import, "ds-name": self.start_import, "ds-split": self.start_import, "ds-export-path": self.export,
                    "rk-old": self.rekey, "rk-new": self.rekey, "rk-new2": self.rekey, "ds-pkg-open": self.start_import,
                    "ds-pkg-out": self.package, "ds-pkg-pass": self.package, "ds-pkg-pass2": self.package}
        if event.input.id in handlers:
            handlers[event.input.id]()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "ds-path":  # a package folder: its passphrase is asked beside it
            from appliance.trust import package

            path = event.value.strip()
            self.query_one("#ds-pkg-open").set_class(bool(path) and package.is_package(Path(path).expanduser()),
                                                     "shown")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        handlers = {"create-go": self.create, "unlock-go": self.unlock, "ds-go": self.start_import,
                    "ds-export-go": self.export, "rk-go": self.rekey, "ds-pkg-go": self.package}
        if event.button.id in handlers:
            handlers[event.button.id]()

    def _take(self, *ids: str) -> list[str]:
        """The passphrase fields' values, cleared at once: nothing keeps a passphrase on screen or in a widget."""
        values = []
        for i in ids:
            field = self.query_one(f"#{i}", Input)
            values.append(field.value)
            field.value = ""
        return values

    def create(self) -> None:
        first, second = self._take("new-pass", "new-pass2")
        if first != second:
            from appliance.errors import InvalidInput

            self.query_one("#new-pass", Input).focus()
            self.app.show_error(InvalidInput("the two passphrases differ; type the same one twice."))
            return
        kdf = self.kdf

        def job():
            from appliance.trust import keys
            from appliance.trust import keyring

            vault = keyring.init(first, kdf) if kdf else keyring.init(first)
            keys.use_vault(vault)
            return "open"

        self.call(job, self.opened, group="vault")

    def unlock(self) -> None:
        (passphrase,) = self._take("pass")

        def job():
            from appliance.trust import keys
            from appliance.trust import keyring

            keys.use_vault(keyring.unlock(passphrase))
            return "open"

        self.call(job, self.opened, group="vault")

    def opened(self, state: str) -> None:
        self.notify("the vault is open for this session")
        self.show_state(state)

    def action_lock(self) -> None:
        if self.state != "open":
            return
        from appliance.trust import keys
        from appliance.trust import signing

        keys.use_vault(None)
        signing.use(None)
        self.hide_forms()
        self.rows, self.report, self.browsed = [], None, []
        self.query_one("#ds-output", Static).update("")
        self.notify("the vault is locked: its keys are forgotten by this session")
        self.refresh_data()

    # -- import ------------------------------------------------------------------

    def toggle_form(self, form_id: str, first: str) -> None:
        """Show ``form_id`` (hiding the other forms) and focus its ``first`` field, or hide it if shown."""
        if self.state != "open":
            return
        form = self.query_one(form_id)
        shown = not form.has_class("shown")
        self.hide_forms()
        form.set_class(shown, "shown")
        if shown:
            self.query_one(first, Input).focus()
        else:
            self.query_one("#dataset-table", DataTable).focus()

    def hide_forms(self) -> None:
        for form in self.FORMS:
            self.query_one(form).remove_class("shown")
        # a passphrase typed but not used is not kept either
        self._take("rk-old", "rk-new", "rk-new2", "ds-pkg-pass", "ds-pkg-pass2", "ds-pkg-open")

    def action_toggle_import(self) -> None:
        self.toggle_form("#ds-import", "#ds-path")

    def start_import(self) -> None:
        path = self.query_one("#ds-path", Input).value.strip()
        name = self.query_one("#ds-name", Input).value.strip()
        fmt = str(self.query_one("#ds-format", Select).value)
        from appliance.trust import package

        if path and package.is_package(Path(path).expanduser()):
            self.open_package(Path(path).expanduser(), name or None)
            return
        if not path or not name:
            self.query_one("#ds-output", Static).update("give the file to import and a name for the dataset")
            return
        from appliance.errors import InvalidInput
        from appliance.importer import parse_split

        try:
            split = parse_split(self.query_one("#ds-split", Input).value.strip() or "80/10/10")
        except InvalidInput as e:
            self.query_one("#ds-output", Static).update(escape(str(e)))
            return
        bar = self.query_one("#ds-progress", ProgressBar)
        bar.update(total=None, progress=0)
        self.query_one("#ds-progress-row").add_class("shown")
        self.query_one("#ds-progress-label", Label).update(f"importing {escape(Path(path).name)}")
        self.query_one("#ds-output", Static).update("")
        self.report = None

        def job():
            from appliance.trust import keys
            from appliance.importer import import_dataset

            src = Path(path).expanduser()
            total = None
            if src.is_file() and src.suffix.lower() in (".jsonl", ".ndjson"):
                with open(src, "rb") as f:  # a line per record: the bar's length, read before the import
                    total = sum(1 for line in f if line.strip())
            self.app.call_from_thread(bar.update, total=total, progress=0)
            return import_dataset(keys.vault(), src, name, fmt=fmt, split=split,
                                  emit=lambda e: self.app.call_from_thread(self.import_event, e))

        self.call(job, self.imported, group="import")

    def open_package(self, pkg: Path, name: str | None) -> None:
        """A dataset package from another machine: its signature checked, its signer's fingerprint shown for the
        operator to confirm, and only then opened with its passphrase and stored under this vault's."""
        (secret,) = self._take("ds-pkg-open")
        self.query_one("#ds-output", Static).update(f"checking the package {escape(str(pkg))}…")

        def check():
            from appliance.trust import package

            return package.inspect(pkg)

        def confirm(seen: dict) -> None:
            def answered(yes: bool | None) -> None:
                if yes:
                    self.open_confirmed(pkg, name, secret, seen["signer"])
                else:
                    self.query_one("#ds-output", Static).update("not imported: the signer was not confirmed")

            self.app.push_screen(ConfirmDialog(
                f"{pkg} is signed by the key\n{seen['signer']}\n\nIs this the fingerprint the maker's appliance "
                "printed? Only then open it.", yes="It is: open"), answered)

        self.call(check, confirm, group="import")

    def open_confirmed(self, pkg: Path, name: str | None, secret: str, signer: str) -> None:
        self.query_one("#ds-output", Static).update(f"opening the package {escape(str(pkg))}…")

        def job():
            from appliance import hardware
            from appliance.trust import keys, package

            return package.open_package(keys.vault(), pkg, lambda: secret, hardware=hardware.summary(), name=name,
                                        signer=signer)

        def done(result: dict) -> None:
            self.opened_package = result
            self.query_one("#ds-import").remove_class("shown")
            self.query_one("#ds-name", Input).value = ""
            self.query_one("#dataset-table", DataTable).focus()
            from appliance.render import split_counts

            self.query_one("#ds-output", Static).update(
                f"[b]imported package {escape(str(pkg))}[/] as dataset {escape(result['dataset'])} "
                f"({split_counts(result['records'])}); signed by {result['signer']}")
            self.call(list_datasets, self.show_datasets, group="list")

        self.call(job, done, group="import")

    # -- package (ciphertext and the key wrapped under a package passphrase) ---------------------------------

    def action_toggle_package(self) -> None:
        if self.selected() is None and self.state == "open":
            self.query_one("#ds-output", Static).update("no dataset to package: import one first (i)")
            return
        self.toggle_form("#ds-package", "#ds-pkg-out")

    def package(self) -> None:
        name = self.selected()
        if self.state != "open" or name is None:
            return
        out = self.query_one("#ds-pkg-out", Input).value.strip()
        first, again = self._take("ds-pkg-pass", "ds-pkg-pass2")
        from appliance.errors import InvalidInput

        if not out:
            raise InvalidInput("give the folder to write the package to (a new one).")
        if first != again:
            self.query_one("#ds-pkg-pass", Input).focus()
            raise InvalidInput("the two package passphrases differ; type the same one twice.")

        def job():
            from appliance.trust import keys, package

            return package.make(keys.vault(), name, Path(out).expanduser(), first)

        def done(made: dict) -> None:
            self.packaged = made
            self.query_one("#ds-package").remove_class("shown")
            self.query_one("#ds-pkg-out", Input).value = ""
            self.query_one("#dataset-table", DataTable).focus()
            self.query_one("#ds-output", Static).update(
                f"packaged {escape(name)} into {escape(made['out'])}: ciphertext only, the key wrapped under the "
                f"package passphrase; signed by {made['signer']}. On the other machine: Data, i, the package folder "
                f"and its passphrase (or `appliance data import {escape(made['out'])} --signer {made['signer']}`)")
            self.notify(f"packaged {name} for another machine")

        self.call(job, done, group="package")

    def import_event(self, e) -> None:
        bar = self.query_one("#ds-progress", ProgressBar)
        label = self.query_one("#ds-progress-label", Label)
        if e.type == "progress" and isinstance(e.data.get("records"), int):
            bar.update(progress=e.data["records"])
            label.update(f"{e.data['records']} records read")
        elif e.type == "finished":
            n = e.data.get("records_read")
            if isinstance(n, int):
                bar.update(total=max(n, 1), progress=max(n, 1))
            label.update(escape(e.message))
        elif e.type == "stage" and e.message:
            label.update(escape(e.message))

    def imported(self, report: dict) -> None:
        from rich.console import Group

        from appliance.render import import_report

        self.report = report
        self.query_one("#ds-import").remove_class("shown")
        self.query_one("#ds-name", Input).value = ""
        self.query_one("#dataset-table", DataTable).focus()
        rejected = sum(report["rejected"].values())
        self.query_one("#ds-output", Static).update(Group(
            f"[b]imported {escape(report['dataset'])}[/]: {rejected} record(s) rejected", import_report(report)))
        self.call(list_datasets, self.show_datasets, group="list")

    def action_import_demo(self) -> None:
        """The demo's dataset, generated and encrypted as `appliance demo` does: the embedded model's pipeline
        (Models ``e``, then this, then Plan's default recipe) needs no file at all."""
        from appliance.demo import DATASET_ID

        if self.state != "open":
            return

        def job() -> tuple[dict, dict]:
            from appliance.trust import keys
            from appliance.demo import import_dataset, import_preferences

            return import_dataset(keys.vault()), import_preferences(keys.vault())

        def done(counts: tuple[dict, dict]) -> None:
            from appliance.demo import PREFERENCES_ID

            records, pairs = counts
            self.report = None
            self.query_one("#ds-output", Static).update(
                f"[b]{DATASET_ID}[/]: {records['train']} train + {records['validation']} validation + "
                f"{records.get('test', 0)} test records, generated "
                f"here and encrypted (the demo recipe's dataset); [b]{PREFERENCES_ID}[/]: {pairs['train']} train + "
                f"{pairs['validation']} validation + {pairs.get('test', 0)} test preference pairs "
                "(recipes/demo-dpo.yaml's)")
            self.call(list_datasets, self.show_datasets, group="list")

        self.query_one("#ds-output", Static).update(f"generating and encrypting {DATASET_ID}…")
        self.call(job, done, group="import")

    def on_worker_state_changed(self, event) -> None:
        from textual.worker import WorkerState

        if event.worker.group == "import" and event.state == WorkerState.ERROR:
            self.query_one("#ds-progress-label", Label).update("import failed")  # (Pane shows the dialog)

    # -- browse and delete ----------------------------------------------------------

    def action_browse(self) -> None:
        name = self.selected()
        if self.state != "open" or name is None:
            return

        def job():
            from appliance import data

            return data.show(name, "train", BROWSE)

        def done(records: list[dict]) -> None:
            self.browsed = records
            self.query_one("#ds-output", Static).update(records_text(name, records))
            self.query_one("#ds-view").scroll_home(animate=False)

        self.call(job, done, group="browse")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "dataset-table":
            self.action_browse()

    def action_delete(self) -> None:
        name = self.selected()
        if self.state != "open" or name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.delete(name)

        self.app.push_screen(ConfirmDialog(f"crypto-shred dataset {name}? its key is destroyed and cannot be "
                                           "recovered."), answered)

    def delete(self, name: str) -> None:
        def job():
            from appliance.trust import keys
            from appliance.trust import store

            store.remove(keys.vault(), name)
            return name

        def done(name: str) -> None:
            self.notify(f"dataset {name} crypto-shredded")
            self.browsed = []
            self.query_one("#ds-output", Static).update(f"dataset {escape(name)} was crypto-shredded")
            self.call(list_datasets, self.show_datasets, group="list")

        self.call(job, done, group="delete")

    # -- export (plaintext, after a confirmation) ----------------------------------------------------------------

    def action_toggle_export(self) -> None:
        if self.selected() is None and self.state == "open":
            self.query_one("#ds-output", Static).update("no dataset to export: import one first (i)")
            return
        self.toggle_form("#ds-export", "#ds-export-path")

    def export(self) -> None:
        name = self.selected()
        path = self.query_one("#ds-export-path", Input).value.strip()
        split = str(self.query_one("#ds-export-split", Select).value)
        if self.state != "open" or name is None:
            return
        if not path:
            self.query_one("#ds-output", Static).update("give the file to write the plaintext to")
            return
        from appliance.errors import InvalidInput

        out = Path(path).expanduser()
        if out.exists():  # asked again by the library; said here before the question is put
            raise InvalidInput(f"{out} already exists; name a new file for the plaintext export.")
        what = "all splits" if split == "all" else f"the {split} split"

        def answered(yes: bool | None) -> None:
            if yes:
                self.write_plain(name, split, out)

        self.app.push_screen(ConfirmDialog(
            f"write {what} of dataset {name} in PLAINTEXT to {out}? The records leave the vault unencrypted; the "
            "export is recorded in the audit log.", yes="Export"), answered)

    def write_plain(self, name: str, split: str, out: Path) -> None:
        def job():
            from appliance import data

            return data.export_plain(name, None if split == "all" else [split], out)

        def done(n: int) -> None:
            self.exported = (name, n, out)
            self.query_one("#ds-export").remove_class("shown")
            self.query_one("#ds-export-path", Input).value = ""
            self.query_one("#dataset-table", DataTable).focus()
            self.query_one("#ds-output", Static).update(
                f"wrote {n} records of {escape(name)} in plaintext to {escape(str(out))}")
            self.notify(f"exported {n} records of {name} in plaintext")

        self.call(job, done, group="export")

    # -- vault verify ------------------------------------------------------------------------------------------

    def action_verify(self) -> None:
        if self.state != "open":
            return
        self.query_one("#ds-output", Static).update("authenticating every dataset file…")

        def job():
            from appliance.trust import keys
            from appliance.trust import store

            return store.verify(keys.vault())

        self.call(job, self.show_verified, group="verify")

    def show_verified(self, report: list[dict]) -> None:
        from rich.style import Style
        from rich.text import Text

        def style(name: str, bold: bool = False) -> Style:  # the theme's colours (NO_COLOR makes them grey)
            return Style(color=self.app.theme_variables.get(name), bold=bold)

        self.verified = report
        bad = [r for r in report if not r["ok"]]
        out = Text()
        for r in report:
            out.append("ok  " if r["ok"] else "BAD ", style("success") if r["ok"] else style("error", True))
            out.append(r["dataset"] + "\n")
            for p in r["problems"]:
                out.append(f"    {p}\n")
        if not report:
            out.append("the keyring opens; no datasets yet")
        elif bad:
            out.append(f"{len(bad)} of {len(report)} datasets are damaged: ", style("error", True))
            out.append(", ".join(r["dataset"] for r in bad))
        else:
            n = len(report)
            out.append(f"{n} dataset{'s' if n > 1 else ''} checked, every file authentic", style("success"))
        self.query_one("#ds-output", Static).update(out)
        self.query_one("#ds-view").scroll_home(animate=False)

    # -- vault rekey -------------------------------------------------------------------------------------------

    def action_toggle_rekey(self) -> None:
        self.toggle_form("#ds-rekey", "#rk-old")

    def rekey(self) -> None:
        if self.state != "open":
            return
        old, new, again = self._take("rk-old", "rk-new", "rk-new2")
        from appliance.errors import InvalidInput

        if new != again:
            self.query_one("#rk-old", Input).focus()
            raise InvalidInput("the two new passphrases differ; type the same one twice.")
        choice = str(self.query_one("#ds-rekey-kdf", Select).value)
        kdf = None if choice == "same" else choice

        def job():
            from appliance.trust import keys
            from appliance.trust import keyring

            # The keyring now opens with the new passphrase only: this session's vault becomes the rewrapped one
            # (the old one would write its stale copy of the keyring back on the next import).
            keys.use_vault(keyring.rekey(old, new, kdf=kdf))
            return keyring.status()

        def done(status: dict) -> None:
            self.query_one("#ds-rekey").remove_class("shown")
            self.query_one("#dataset-table", DataTable).focus()
            self.query_one("#ds-output", Static).update(
                f"passphrase changed ({escape(status['kdf']['name'])}); {len(status['datasets'])} keys rewrapped, no "
                "data re-encrypted")
            self.notify("the vault's passphrase is changed")

        self.call(job, done, group="rekey")
