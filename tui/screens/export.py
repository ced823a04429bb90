"""Export: a finished run to GGUF files, with each quantization's size and expected quality; the parity checks.

What `appliance export`, `merge`, `bundle` and `verify` do, on the selected run:

* Quantize: the quantizations to make (the recipe's preselected), each with its estimated file size (the base
  model's parameter count from its config.json times the type's bits per weight, plus the tokenizer the file
  carries: an estimate) and its expected quality (typical before an export; after one, the measured top-1
  agreement with the merged model that export.json records). ``e`` exports (merging first when needed), ``m``
  merges alone; the stages are logged live with a progress bar.
* Results: each file with its size, and the checks the export passed (identical template tokens on N held-out
  conversations, the end-of-turn token, the top-1 agreement of f16 and of each quantization); shown again when a
  run exported earlier is selected.
* Bundle: a signed edge bundle of one GGUF into a new folder (``b``), with the key fingerprint to check it by.
* Lineage: the run's GGUF (or any artifact or bundle folder) verified back through its signed ancestors (``l``).
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.markup import escape
from textual.widgets import (Button, Checkbox, DataTable, Input, Label, Log, ProgressBar, Select, SelectionList, Static,
                             TabbedContent, TabPane)
from textual.widgets.selection_list import Selection
from textual.worker import Worker, WorkerState

from .base import Pane, require_unlocked

MiB, GiB = 2**20, 2**30
# Bits per weight of each GGUF type (llama.cpp's block formats: q8_0 is 32 int8 + one f16 scale per block; the
# k-quant mixes are averages over a model's tensors).
BITS = {"f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5}
Q6_K = 6.5625  # llama.cpp keeps the output matrix at Q6_K below 8 bits (Q8_0 when its rows are not 256-multiples)
TOKENIZER_BYTES = 36  # per vocabulary entry: the token text, its type and the BPE merges in the file's metadata
HINT = "e export · m merge · a adapter GGUF · b bundle · l lineage (space checks a quantization)"
NO_RUNS = "no finished runs yet: train one on the Plan screen (key 5), follow it on Train (key 6)"
TYPICAL = {"f16": "the reference: held to ≥ 99% top-1", "bf16": "lossless: the merged weights",
           "q8_0": "near-lossless", "q5_k_m": "very small quality loss", "q4_k_m": "small quality loss",
           "q4_0": "more loss than q4_k_m (legacy)"}


def estimate_bytes(shape, quant: str) -> int:
    """The GGUF file's size from the model's shape (appliance.plan.Shape): an estimate, good to a few percent."""
    bits = BITS[quant]
    out_params = shape.vocab * shape.hidden  # the output matrix (the embeddings themselves when tied)
    out_bits = bits if bits >= BITS["q8_0"] else (Q6_K if shape.hidden % 256 == 0 else BITS["q8_0"])
    norms = shape.hidden * (2 * shape.layers + 1)  # kept at f32
    rest = shape.total_params - out_params - norms
    return int(rest * bits / 8 + out_params * out_bits / 8 + norms * 4 + shape.vocab * TOKENIZER_BYTES)


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def load_runs() -> list[dict]:
    """The finished runs, each with its recipe's quantizations, its base model's shape and its saved results."""
    from appliance import plan, runs
    from appliance.trust import manifest
    from appliance.errors import ApplianceError

    out = []
    for r in runs.list_runs():
        if r["state"] != "finished":
            continue
        path = Path(r["path"])
        r.update(runs.reports(r["id"]))
        r["merged"] = (path / "merged" / manifest.NAME).is_file()
        r["gguf_dir"] = str(path / "gguf")
        r["checkpoints"] = checkpoint_choices(r)
        try:
            r["quants"] = list(runs.load_recipe(r["id"]).export.quant)
        except (ApplianceError, OSError, ValueError):  # a run folder without a readable recipe
            r["quants"] = ["f16"]
        try:
            r["shape"] = plan.load_shape(r["base_model"])[0]
        except ApplianceError:  # the base model is gone: the sizes cannot be estimated
            r["shape"] = None
        out.append(r)
    return out


def checkpoint_choices(run: dict) -> list[tuple[str, str]]:
    """(label, value) of the adapters a run offers merge, export and bundle: best, last, then each saved step."""
    from appliance import runs

    s = run.get("summary") or {}
    steps = int(s.get("steps") or 0)
    best = s.get("best_checkpoint")
    out = [(f"best · step {best.split('-')[1] if best else steps}", "best"), (f"last · step {steps}", "last")]
    saved = [runs.step_of(p) for p in runs.checkpoints(run["id"])]
    return out + [(f"step {step}", str(step)) for step in saved if step != steps]


def quant_prompt(q: str, shape, measured: dict | None) -> Content:
    est = f"~{size(estimate_bytes(shape, q))}" if shape is not None else "size ?"
    if measured and isinstance(measured.get("top1_agreement"), (int, float)):
        quality = f"top-1 {measured['top1_agreement']:.1%} (measured)"
        return Content.from_markup(f"{q:<7} {est:>11}  [$success]$quality[/]", quality=quality)
    return Content.from_markup(f"{q:<7} {est:>11}  [dim]$quality[/]", quality=TYPICAL[q])


def results_text(run: dict) -> str:
    """The run's GGUF files and the export's checks, from export.json (and merge.json) (Textual markup)."""
    ex, merge = run.get("export"), run.get("merge")
    rid = escape(run["id"])
    if not ex:
        lines = [f"[b]{rid}[/] is not exported yet: check the quantizations on the Quantize tab and press e"]
    else:
        shape = run.get("shape")
        lines = [f"[b]GGUF files[/] in runs/{rid}/gguf/",
                 f"[b]{'quant':<7} {'size':>10} {'estimate':>11}  top-1 vs merged[/]"]
        for q, f in ex["files"].items():
            est = f"~{size(estimate_bytes(shape, q))}" if shape is not None and q in BITS else "-"
            rate = f.get("top1_agreement")
            agreement = f"{rate:.2%}" if isinstance(rate, (int, float)) else "-"
            lines.append(f"{escape(q):<7} {size(f['bytes']):>10} {est:>11}  {agreement}")
            if f.get("fallback_tensors"):
                lines.append(f"  [dim]{f['fallback_tensors']} of {f['tensors']} tensors in llama.cpp's fallback type "
                             "(rows not 256-multiples)[/]")
        p = ex["parity"]
        ok = "[$success]ok[/]"
        lines += ["", "[b]parity checks[/] (the GGUF against the merged model, on held-out conversations)",
                  f"{ok} template: llama.cpp's tokens identical to training's on {p['template_conversations']} "
                  "conversations",
                  f"{ok} end of turn: {escape(repr(p['eot_token']))} (id {p['eot_token_id']}) ends generation",
                  f"{ok} f16 top-1 agreement {p['top1_agreement']:.2%} over {p['positions']} positions "
                  "(the bar: 99%)"]
        for q, f in ex["files"].items():
            if q != "f16" and isinstance(f.get("top1_agreement"), (int, float)):
                lines.append(f"·  {escape(q)} top-1 agreement {f['top1_agreement']:.2%} (lossy by design: its "
                             "expected quality)")
        quality = ex.get("quality")
        if quality:
            from appliance.evaluate.quants import fits_by_size

            by = quality["by_quant"]
            lines += ["", f"[b]quality per quantization[/] on {quality['samples']} {quality['split']} answers",
                      f"[b]{'quant':<7} {'size':>10} {'perplexity':>11} {'KL vs f16':>10} {'same top-1':>10}[/]"]
            for q, v in by.items():
                lines.append(f"{escape(q):<7} {size(v['bytes']):>10} {v['perplexity']:>11.3f} "
                             f"{v['kl_divergence']:>10.4f} {v['same_top1']:>10.1%}")
            fits = fits_by_size(by)
            if fits:
                lines.append("for an edge box: " + ", ".join(f"{g:g} GiB → {escape(q)}" for g, q in fits)
                             + " (bundle: GGUF auto + a max size)")
    if ex and ex.get("label"):
        lines += ["", f"[b]exported from[/] {escape(ex['label'])}"]
    if merge:
        lines += ["", f"[b]merge[/]: {escape(merge.get('label') or 'the final adapter')}; saved as "
                      f"{escape(str(merge['dtype']))}; {escape(merge_summary(merge))}"]
    return "\n".join(lines)


def merge_summary(merge: dict) -> str:
    """What merge.json says its checks found, in one line (older merge.json files have the logits check only)."""
    parts = []
    if merge.get("max_abs_logit_diff") is not None:
        parts.append(f"max |logit diff| vs base+adapter {merge['max_abs_logit_diff']:.2e} over "
                     f"{merge.get('positions', 0)} positions of {merge.get('prompts', 0)} held-out prompts")
    elif merge.get("logit_check"):
        parts.append(f"logits check skipped ({merge['logit_check']})")
    if merge.get("weights_checked") is not None:
        parts.append(f"{merge['weights_checked']} merged weights within {merge['max_weight_excess']:.2f} of their "
                     "rounding bound")
    return "; ".join(parts)


class ExportScreen(Pane):
    BINDINGS = [Binding("e", "export", "export"), Binding("m", "merge", "merge"),
                # Not in the footer (at 80 columns it would push out the quit key); the hint line and `?` show it.
                Binding("a", "export_adapter", "adapter GGUF", show=False,
                        tooltip="the LoRA as a GGUF adapter, checked against the merged model (`export --adapter`): "
                                "one base then serves each tenant its adapter (Serve, key w)"),
                Binding("b", "bundle", "bundle"), Binding("l", "lineage", "lineage")]
    DEFAULT_CSS = """
    ExportScreen #ex-runs { height: auto; max-height: 6; }
    ExportScreen #ex-tabs { height: 1fr; }
    ExportScreen #ex-tabs TabPane { padding: 0; }
    ExportScreen #ex-quant-row { height: auto; }
    ExportScreen #ex-quants { width: 1fr; }
    ExportScreen #ex-actions { width: 22; height: auto; }
    ExportScreen #ex-actions Button, ExportScreen #ex-checkpoint { width: 100%; min-width: 10; }
    ExportScreen #ex-note { height: auto; padding: 0 1; color: $text-muted; }
    ExportScreen #ex-log { height: 1fr; min-height: 2; overflow: auto; display: none; }
    ExportScreen #ex-log.shown { display: block; }
    ExportScreen .form { height: auto; }
    ExportScreen .form Input { width: 1fr; }
    ExportScreen .form Button { min-width: 10; width: auto; }
    ExportScreen #ex-bundle-quant { width: 20; }
    ExportScreen #ex-bundle-max { width: 18; }
    ExportScreen #ex-results-view { height: 1fr; padding: 0 1; }
    ExportScreen #ex-results, ExportScreen #ex-bundle-result, ExportScreen #ex-verify-info { height: auto; }
    ExportScreen #ex-bundle-result, ExportScreen #ex-verify-info { padding: 0 1; }
    ExportScreen #ex-lineage { height: auto; max-height: 8; }
    ExportScreen #ex-progress-row { height: auto; border-top: solid $accent; }
    ExportScreen #ex-stage { width: 1fr; height: auto; padding: 0 1; }
    ExportScreen #ex-bar { width: auto; display: none; }
    ExportScreen #ex-bar.shown { display: block; }
    ExportScreen #ex-bar Bar { width: 20; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.runs: dict[str, dict] = {}
        self.order: list[str] = []
        self.shown: str | None = None  # the run the tabs show
        self.working: str | None = None  # what runs now: export, merge, bundle, verify
        self.steps = 0  # stages expected of the work, for the progress bar
        self.seen = 0
        self.result: dict | None = None  # the last export's result
        self.bundled: dict | None = None
        self.verified: dict | None = None

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="ex-runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("finished run", "base model", "exported", "merged")
        yield table
        with TabbedContent(id="ex-tabs"):
            with TabPane("Quantize", id="ex-quantize"):
                with Horizontal(id="ex-quant-row"):
                    yield SelectionList[str](id="ex-quants")
                    with Vertical(id="ex-actions"):
                        yield Select([("best", "best")], id="ex-checkpoint", allow_blank=False,
                                     tooltip="which adapter merge, export and bundle take: best (lowest validation "
                                             "loss), last, or a saved step")
                        yield Button("Export", id="ex-go", variant="primary")
                        yield Button("Merge", id="ex-merge")
                yield Static("", id="ex-note")
                yield Log(id="ex-log", max_lines=500)
            with TabPane("Results", id="ex-results-tab"):
                with VerticalScroll(id="ex-results-view"):
                    yield Static("", id="ex-results")
            with TabPane("Bundle", id="ex-bundle"):
                with Horizontal(classes="form"):
                    yield Input(placeholder="a new folder for the bundle", id="ex-bundle-out")
                    yield Select([], prompt="GGUF", id="ex-bundle-quant")
                    yield Input(placeholder="max size (auto)", id="ex-bundle-max",
                                tooltip="with GGUF auto: the largest model file the edge box takes, e.g. 2GB")
                    yield Checkbox("adapter", id="ex-bundle-adapter",
                                   tooltip="also carry the run's GGUF adapter (key a) and say in serve.json which "
                                           "base it is served on")
                    yield Button("Bundle", id="ex-bundle-go", variant="primary")
                yield Static("a signed folder an edge box runs and checks: the GGUF, its chat template, a "
                             "Modelfile, the model card and every ancestor's signed manifest", id="ex-bundle-result")
            with TabPane("Lineage", id="ex-lineage-tab"):
                with Horizontal(classes="form"):
                    yield Input(placeholder="the run's GGUF; or a bundle folder, or any artifact", id="ex-verify-path")
                    yield Input(placeholder="trusted .pub or fingerprint", id="ex-verify-key",
                                tooltip="optional: the key the signatures must be made with (a copy of the "
                                        "appliance's signing-key.pub, or the 64-hex fingerprint `bundle` printed); "
                                        "default: this workspace's key")
                    yield Button("Verify", id="ex-verify-go", variant="primary")
                table = DataTable(id="ex-lineage", cursor_type="row", zebra_stripes=True)
                table.add_columns("status", "role", "kind", "id")
                yield table
                yield Static("l verifies the run's GGUF: its signed manifest, then each ancestor's (merged model, "
                             "adapter, run, base model, dataset) found in this workspace", id="ex-verify-info")
        with Horizontal(id="ex-progress-row"):
            yield Label(HINT, id="ex-stage")
            yield ProgressBar(id="ex-bar", show_eta=False)

    def on_mount(self) -> None:
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#ex-runs", DataTable).focus()

    def refresh_data(self) -> None:
        self.call(load_runs, self.show_runs, group="list")

    def show_runs(self, rows: list[dict]) -> None:
        table = self.query_one("#ex-runs", DataTable)
        keep = self.selected()
        self.runs = {r["id"]: r for r in rows}
        self.order = [r["id"] for r in rows]
        table.clear()
        for r in rows:
            exported = ", ".join(r["export"]["files"]) if r.get("export") else "-"
            table.add_row(r["id"], r["base_model"], exported, "yes" if r["merged"] else "-", key=r["id"])
        if not rows:
            self.shown = None
            self.stage(NO_RUNS)
            self.query_one("#ex-results", Static).update("")
            return
        if str(self.query_one("#ex-stage", Label).render()) == NO_RUNS:
            self.stage(HINT)
        if keep in self.runs:
            table.move_cursor(row=self.order.index(keep))
        self.show_run(self.selected(), force=True)

    def selected(self) -> str | None:
        table = self.query_one("#ex-runs", DataTable)
        if not self.order or not 0 <= table.cursor_row < len(self.order):
            return None
        return self.order[table.cursor_row]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "ex-runs" and event.row_key is not None and event.row_key.value:
            self.show_run(event.row_key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "ex-runs":
            self.query_one("#ex-tabs", TabbedContent).active = "ex-quantize"
            self.query_one("#ex-quants", SelectionList).focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        event.stop()  # this screen's own tabs: not the app's (its handler builds the screen of a tab)

    def show_run(self, run_id: str | None, force: bool = False) -> None:
        r = self.runs.get(run_id or "")
        if r is None or (run_id == self.shown and not force):
            return
        changed = run_id != self.shown
        self.shown = run_id
        self.show_quants(r, keep_checks=not changed)
        pick = self.query_one("#ex-checkpoint", Select)
        keep = pick.value if not changed else "best"
        pick.set_options(r["checkpoints"])
        pick.value = keep if any(v == keep for _, v in r["checkpoints"]) else "best"
        self.query_one("#ex-results", Static).update(results_text(r))
        files = list((r.get("export") or {}).get("files", {}))
        choice = self.query_one("#ex-bundle-quant", Select)
        current = choice.value
        measured = bool((r.get("export") or {}).get("quality"))
        choice.set_options([(q, q) for q in files] + ([("auto (best fit)", "auto")] if measured else []))
        if current in files and not changed:
            choice.value = current
        elif files:
            choice.value = "q4_k_m" if "q4_k_m" in files else min(files, key=lambda q: BITS.get(q, 99))
        if changed and self.verified is not None:  # another run's lineage: not this one's
            self.verified = None
            self.query_one("#ex-lineage", DataTable).clear()
            self.query_one("#ex-verify-info", Static).update(f"l verifies the GGUF of {run_id}")

    def show_quants(self, r: dict, keep_checks: bool) -> None:
        from appliance.recipes import QUANTS

        quants = self.query_one("#ex-quants", SelectionList)
        checked = set(quants.selected) if keep_checks and quants.option_count else set(r["quants"])
        files = (r.get("export") or {}).get("files", {})
        highlighted = quants.highlighted
        quants.clear_options()
        quants.add_options([Selection(quant_prompt(q, r["shape"], files.get(q)), q, q in checked) for q in QUANTS])
        quants.highlighted = highlighted if highlighted is not None else 0
        shape = r["shape"]
        basis = (f"{params(shape.total_params)} parameters of {r['base_model']} × bits per weight, plus the "
                 "tokenizer" if shape is not None else f"{r['base_model']}'s config.json is not in the workspace")
        self.query_one("#ex-note", Static).update(Content(
            f"~ estimated sizes: {basis}. Quality: typical until exported, then the measured top-1 agreement "
            "with the merged model."))

    def stage(self, text: str) -> None:
        self.query_one("#ex-stage", Label).update(Content(text))

    # -- the work --------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        handlers = {"ex-go": self.action_export, "ex-merge": self.action_merge, "ex-bundle-go": self.action_bundle,
                    "ex-verify-go": self.action_lineage}
        if event.button.id in handlers:
            handlers[event.button.id]()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "ex-bundle-out":
            self.action_bundle()
        elif event.input.id in ("ex-verify-path", "ex-verify-key"):
            self.action_lineage()

    def _run(self) -> str:
        from appliance.errors import InvalidInput

        if self.working:
            raise InvalidInput(f"the {self.working} is still running; wait for it to finish.")
        run_id = self.selected()
        if run_id is None:
            raise InvalidInput("there is no finished run here; train one on the Plan screen (key 5) first.")
        return run_id

    def _start(self, what: str, run_id: str, steps: int | None, job, done) -> None:
        self.working = what
        self.steps, self.seen = steps or 0, 0
        bar = self.query_one("#ex-bar", ProgressBar)
        bar.update(total=steps, progress=0)
        bar.add_class("shown")
        self.stage(f"{what} of {run_id}…")
        self.call(job, done, group="work")

    def log_line(self, line: str) -> None:
        log = self.query_one("#ex-log", Log)
        log.add_class("shown")
        log.write_line(line)

    def _emit(self, e) -> None:
        self.app.call_from_thread(self.on_work_event, e)

    def on_work_event(self, e) -> None:
        bar = self.query_one("#ex-bar", ProgressBar)
        if e.type == "stage" and e.message:
            self.seen += 1
            if self.steps:
                bar.update(progress=min(self.seen - 1, self.steps))
            self.log_line(f"» {e.message}")
            self.stage(e.message)
        elif e.type == "warning" and e.message:
            self.log_line(f"warning: {e.message}")
        elif e.type == "progress" and e.message and isinstance(e.data.get("total"), int):
            self.stage(e.message)  # merge's shards: "shard 3 of 30 merged", then "checked shard 3 of 30"
            self.log_line(f"  {e.message}")
        elif e.type == "finished" and e.message:
            self.log_line(f"✓ {e.message}")
            if e.stage == self.working:
                self.finish_bar()

    def finish_bar(self) -> None:
        bar = self.query_one("#ex-bar", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)

    def action_export(self) -> None:
        from appliance.errors import InvalidInput

        run_id = self._run()
        quants = list(self.query_one("#ex-quants", SelectionList).selected)
        if not quants:
            raise InvalidInput("check at least one quantization (space toggles the highlighted one).")
        r = self.runs[run_id]
        made = ["f16", *[q for q in quants if q != "f16"]]
        checkpoint = self.checkpoint()
        # merge (when needed) + convert + a quantization each + the checks
        steps = (0 if r["merged"] else 1) + 1 + len(made) - 1 + 1
        self.log_line(f"export {run_id} ({checkpoint}): {', '.join(made)} (replacing its GGUF files)")
        self.query_one("#ex-tabs", TabbedContent).active = "ex-quantize"

        def job():
            require_unlocked()  # the files' manifest is signed; the checks read the held-out split
            from appliance.export import export

            return run_id, export(run_id, quants, emit=self._emit, checkpoint=checkpoint)

        self._start("export", run_id, steps, job, self.exported)

    def exported(self, out: tuple) -> None:
        run_id, result = out
        self.working = None
        self.result = result
        self.finish_bar()
        sizes = ", ".join(f"{q} {size(f['bytes'])}" for q, f in result["files"].items())
        self.stage(f"exported {run_id}: {sizes}; checks passed")
        if run_id in self.runs:
            self.runs[run_id].update(export=result, merged=True)
            self.show_run(run_id, force=True)
        self.query_one("#ex-tabs", TabbedContent).active = "ex-results-tab"
        self.refresh_data()

    def checkpoint(self) -> str:
        value = self.query_one("#ex-checkpoint", Select).value
        return "best" if value == Select.NULL else str(value)

    def _at_checkpoint(self, what: str, command: str, steps: int, stage: str, done) -> None:
        """Run one of the library's stages (``"module:function"``, imported in the worker) on the selected run at
        the chosen checkpoint; its manifest is signed and its check reads held-out prompts: the vault must be open."""
        run_id = self._run()
        checkpoint = self.checkpoint()
        self.log_line(f"{command} {run_id} ({checkpoint})")
        self.query_one("#ex-tabs", TabbedContent).active = "ex-quantize"

        def job():
            import importlib

            require_unlocked()
            module, name = stage.split(":")
            return run_id, getattr(importlib.import_module(module), name)(run_id, emit=self._emit, checkpoint=checkpoint)

        self._start(what, run_id, steps, job, done)

    def action_merge(self) -> None:
        self._at_checkpoint("merge", "merge", 1, "appliance.merge:merge", self.merged)

    def merged(self, out: tuple) -> None:
        run_id, result = out
        self.working = None
        self.finish_bar()
        self.stage(f"merged {run_id} at {result['label']} ({merge_summary(result)})")
        if run_id in self.runs:
            self.runs[run_id].update(merge=result, merged=True)
            self.show_run(run_id, force=True)
        self.refresh_data()

    def action_export_adapter(self) -> None:
        self._at_checkpoint("adapter", "export --adapter", 2, "appliance.export:export_adapter", self.adapter_exported)

    def adapter_exported(self, out: tuple) -> None:
        run_id, result = out
        self.working = None
        self.finish_bar()
        self.stage(f"adapter GGUF of {run_id} ({result['label']}): {size(result['bytes'])}, top-1 agreement with the "
                   f"merged model {result['top1_agreement']:.2%}; serve it on {result['base_model']} (Serve, key w)")
        self.refresh_data()

    def action_bundle(self) -> None:
        from appliance.errors import InvalidInput

        run_id = self._run()
        tabs = self.query_one("#ex-tabs", TabbedContent)
        out_field = self.query_one("#ex-bundle-out", Input)
        out = out_field.value.strip()
        quant = self.query_one("#ex-bundle-quant", Select).value
        if not out:
            tabs.active = "ex-bundle"
            out_field.focus()
            self.stage("name a new folder for the bundle, then press Enter")
            return
        if quant == Select.NULL:
            raise InvalidInput(f"run {run_id} has no GGUF to bundle; export it first (e).")
        tabs.active = "ex-bundle"
        checkpoint = self.checkpoint()
        from appliance.evaluate.quants import parse_size

        raw_max = self.query_one("#ex-bundle-max", Input).value.strip()
        max_size = parse_size(raw_max) if raw_max and quant == "auto" else None
        with_adapter = self.query_one("#ex-bundle-adapter", Checkbox).value
        self.query_one("#ex-bundle-result", Static).update(Content(f"bundling {quant} of {run_id} into {out}…"))

        def job():
            require_unlocked()  # the bundle's manifest is signed
            from appliance import bundle

            return bundle.create(run_id, Path(out), quant=str(quant), emit=self._emit, checkpoint=checkpoint,
                                 max_size=max_size, adapter=with_adapter)

        self._start("bundle", run_id, 2, job, self.bundle_done)

    def bundle_done(self, result: dict) -> None:
        self.working = None
        self.bundled = result
        self.finish_bar()
        self.stage(f"bundle written to {result['path']}")
        self.query_one("#ex-bundle-result", Static).update(Content.from_markup(
            "[b]bundle written[/] to $path ($model, $size)$why\nfiles: $files\n[b]signed by the key with fingerprint[/]\n"
            "[$accent]$key[/]\non the edge box: appliance bundle verify DIR --fingerprint $key",
            path=result["path"], model=result["model"], size=size(result["bytes"]), files=", ".join(result["files"]),
            key=result["key"], why=f"\nauto chose {result['chosen_because']}" if result.get("chosen_because") else ""))

    def action_lineage(self) -> None:
        from appliance.errors import InvalidInput

        if self.working:
            raise InvalidInput(f"the {self.working} is still running; wait for it to finish.")
        typed = self.query_one("#ex-verify-path", Input).value.strip()
        run_id = self.selected()
        if not typed and run_id is None:
            raise InvalidInput("select a finished run, or name an artifact folder to verify.")
        path = Path(typed).expanduser() if typed else Path(self.runs[run_id]["gguf_dir"])
        key = self.query_one("#ex-verify-key", Input).value.strip()
        self.query_one("#ex-tabs", TabbedContent).active = "ex-lineage-tab"

        def job():
            from appliance import bundle
            from appliance.trust import provenance, signing
            from appliance.errors import CheckFailed

            # The trusted key as `verify --pubkey` and `bundle verify --pubkey/--fingerprint` take it.
            fingerprint = signing.as_fingerprint(key)
            public = signing.load_public(Path(key).expanduser()) if key and not fingerprint else None
            if (path / bundle.SUMS).is_file():  # an edge bundle: checked as `appliance bundle verify DIR` does
                if not key:
                    public = signing.workspace_public()
                result = bundle.verify_bundle(path, public, fingerprint=fingerprint)
                rows = [("ok" if i["status"] == "ok" else i["status"], i["kind"], i["kind"], i["id"])
                        for i in result["lineage"]]
                return {"ok": True, "bundle": True, "key": result["key"], "trusted": result["trusted_key"],
                        "rows": rows, "problems": [], "path": str(path)}
            if fingerprint:  # a workspace artifact is checked with the keyring's key: the one to compare
                public = signing.workspace_public()
                if public is None or signing.fingerprint(public) != fingerprint:
                    raise CheckFailed(f"this workspace's signing key is not the trusted fingerprint "
                                      f"{fingerprint[:16]}...; its artifacts were not signed by that appliance.")
            result = provenance.verify(path, public)
            rows = [(i["status"], i["role"], i["kind"] or "", i["id"] or "") for i in result["lineage"]]
            problems = [i["problem"] for i in result["lineage"] if i["status"] == "bad"]
            return {"ok": result["ok"], "bundle": False, "key": result["key"], "trusted": True, "rows": rows,
                    "problems": problems, "path": str(path)}

        self._start("verify", run_id or "", None, job, self.verify_done)
        self.stage(f"verifying {path} and its lineage…")

    def verify_done(self, result: dict) -> None:
        self.working = None
        self.verified = result
        self.finish_bar()
        table = self.query_one("#ex-lineage", DataTable)
        table.clear()
        marks = {"ok": "ok", "bad": "[b]BAD[/]", "absent": "[dim]absent[/]"}  # (rich markup: a table cell)
        for status, role, kind, ident in result["rows"]:
            table.add_row(marks.get(status, status), role, kind, ident)
        info = self.query_one("#ex-verify-info", Static)
        what = "bundle intact" if result["bundle"] else ("lineage ok" if result["ok"] else "lineage BROKEN")
        lines = [f"[b]{what}[/]: signed by {escape(result['key'][:16])}…"]
        if not result["trusted"]:
            lines.append("[$warning]checked against the key inside the bundle: compare its fingerprint with the "
                         "appliance's, obtained out of band[/]")
        lines += [f"[$error]{escape(p)}[/]" for p in result["problems"]]
        info.update("\n".join(lines))
        self.stage(f"{what}: {len(result['rows'])} manifests checked")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "work" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            what = self.working or "work"
            self.working = None
            self.query_one("#ex-bar", ProgressBar).remove_class("shown")
            self.stage(f"the {what} failed" if event.state == WorkerState.ERROR else f"the {what} was cancelled")
            # (Pane's handler, called too, shows the error dialog)
