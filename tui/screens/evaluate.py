"""Evaluate: the tuned model against its base on the test split (what `appliance eval RUN` does).

The runs, each with its saved report (``runs/<id>/eval.json``: the scores only); a run selected shows its scores
base against tuned with the difference. Evaluating runs ``appliance.evaluate.evaluate`` in a thread, with its stage
and its progress (per model, per prompt) live; after it, a few held-out examples side by side (prompt, reference,
base answer, tuned answer). Those examples stay in this session's memory: the report on disk holds no dataset
text, which stays in the vault.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from .base import Pane, require_unlocked

DEFAULT_SAMPLES = 48
EXAMPLE_CHARS = 160  # of each text in the side-by-side examples
HINT = "e evaluates the selected run: base and tuned answer the same test prompts · v reviews the answers blind"
NO_RUNS = "no runs yet: train one on the Plan screen (key 5)"


def load_runs() -> list[dict]:
    """Every run with the reports saved beside it (read in a worker: it touches every run's folder and pid)."""
    from appliance import runs

    out = []
    for r in runs.list_runs():
        r.update(runs.reports(r["id"]))
        r["gguf_f16"] = (Path(r["path"]) / "gguf" / "model-f16.gguf").is_file()
        out.append(r)
    return out


def report_text(report: dict, run_id: str) -> str:
    """The scores, base against tuned, and the difference with its 95% interval (Textual markup: theme colours;
    a difference within the noise of the test set is not coloured)."""
    from appliance.evaluate.names import better, delta, label, span, value

    metrics = report["metrics"]
    width = max(len("metric"), *(len(label(m)) for m in metrics))
    lines = [f"[b]{escape(run_id)}[/]: {report.get('split', 'held-out')} split, {report['samples']} examples "
             "(runs/…/eval.json)" + (f"; base = {escape(report['reference'])}" if report.get("reference") else "")]
    if report.get("note"):
        lines.append(f"[$warning]{escape(report['note'])}[/]")
    lines.append(f"[b]{'metric':<{width}}  {'base':>7}  {'tuned':>7}  {'difference':>11}  95% interval[/]")
    for m in metrics:
        b, t = float(report["base"][m]), float(report["tuned"][m])
        diff = delta(m, t - b)
        style = ("$success" if better(m, t, b) else "$error") if m in report.get("significant", [m]) else ""
        cell = f"[{style}]{diff:>11}[/]" if style else f"{diff:>11}"
        lines.append(f"{label(m):<{width}}  {value(m, b):>7}  {value(m, t):>7}  {cell}  "
                     f"{escape(span(m, report.get('differences', {}).get(m)))}")
    decisive = label(report.get("decisive") or metrics[-1])
    if report.get("tuned_beats_base"):
        lines.append(f"[$success]the tuned model beats its base on {decisive}[/]")
    else:
        lines.append(f"[$warning]the tuned model does not beat its base on {decisive}[/]")
    improved = [label(m) for m in report.get("improved") or []]
    significant = [label(m) for m in report.get("significant") or []]
    lines.append(f"improved: {', '.join(improved) if improved else 'none'}; beyond the noise (95%): "
                 f"{', '.join(significant) if significant else 'none'}")
    q = report.get("quants")
    if q:
        cells = [f"{escape(name)} {v['bytes'] / 2**20:.0f} MiB ppl {v['perplexity']:.3f} KL {v['kl_divergence']:.4f}"
                 for name, v in q["by_quant"].items()]
        lines.append(f"[b]quantizations[/] ({q['samples']} {q['split']} answers): {'; '.join(cells)}")
    hx = report.get("harness")
    if hx and hx.get("base"):
        from appliance.evaluate.names import harness_rows

        cells = [f"{escape(task)} {metric} {b:.3f} → {float('nan') if t is None else t:.3f}"
                 for task, metric, b, t, _ in harness_rows(hx)]
        lines.append(f"[b]lm-evaluation-harness[/] (base → tuned): {'; '.join(cells)}")
    if report.get("html"):
        lines.append(f"the report to read, with its charts: {escape(report['html'])} (opens offline in a browser)")
    if report.get("forgetting"):
        f = report["forgetting"]
        style = "$error" if f["forgetting"] else "$success"
        lines.append(f"[b]forgetting check[/] ({f['items']} general-ability items, chance {f['chance']:.1%}): base "
                     f"{f['base']:.1%}, tuned {f['tuned']:.1%}, difference [{style}]{(f['tuned'] - f['base']) * 100:+.1f} "
                     f"pts[/] {span('share', f['difference'])}" + (f"\n[$error]{escape(f['warning'])}[/]"
                                                                  if f["forgetting"] else ""))
    if report.get("judge"):
        j, t = report["judge"], report["judge"]["tally"]
        lines.append(f"[b]judge {escape(j['model'])}[/] ({j['items']} pairs, both orders): tuned better "
                     f"{t['tuned_wins']}, tie {t['ties']}, base better {t['base_wins']}; tuned win rate "
                     f"{j['win_rate']:.1%} {span('share', j['win_rate_interval'])}, consistency {j['consistency']:.1%}")
        lines.append(f"[dim]{escape(j['advisory'])}" + (f"; {escape(j['note'])}" if j.get("note") else "") + "[/]")
    for rv in report.get("reviews", []):
        rate = f"{rv['win_rate']:.1%} {span('share', rv['win_rate_interval'])}" if rv["win_rate"] is not None else "-"
        lines.append(f"[b]review by {escape(rv['reviewer'])}[/] ({rv['items']} items): tuned better "
                     f"{rv['tuned_wins']}, tie {rv['ties']}, base better {rv['base_wins']}, skipped {rv['skipped']}; "
                     f"tuned win rate {rate}")
    return "\n".join(lines)


def clip(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def pair_examples(report: dict, records: list[dict]) -> list[dict]:
    """The report's answers (a few per model) beside each held-out prompt and its reference."""
    by_index: dict[int, dict] = {}
    for e in report.get("examples", []):
        by_index.setdefault(int(e["index"]), {})[e["model"]] = e["answer"]
    out = []
    for i in sorted(by_index):
        if i >= len(records):
            continue
        msgs = records[i]["messages"]
        prompt = next((m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user"), "")
        out.append({"index": i, "prompt": prompt, "reference": msgs[-1]["content"],
                    "base": by_index[i].get("base", ""), "tuned": by_index[i].get("tuned", "")})
    return out


def examples_table(examples: list[dict]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="test examples, side by side", title_justify="left", show_lines=True, expand=True)
    for name in ("prompt", "reference", "base", "tuned"):
        table.add_column(name, ratio=1, overflow="fold")
    for e in examples:
        table.add_row(*(Text(clip(e[k])) for k in ("prompt", "reference", "base", "tuned")))
    return table


class ReviewDialog(ModalScreen[dict | None]):
    """One blind item at a time: the prompt, its reference, answers A and B (sides drawn at random); a or b picks
    the better, t a tie, s skips; escape ends the review and saves the tally (who, counts) to eval.json and the
    audit log."""

    BINDINGS = [Binding("a", "vote('a')", "A better"), Binding("b", "vote('b')", "B better"),
                Binding("t", "vote('tie')", "tie"), Binding("s", "vote('skip')", "skip"),
                Binding("escape", "finish", "finish")]
    DEFAULT_CSS = """
    ReviewDialog { align: center middle; }
    ReviewDialog > Vertical { width: 100; max-width: 95%; height: 90%; border: thick $accent; padding: 0 1;
                              background: $surface; }
    ReviewDialog #rv-item { height: 1fr; }
    ReviewDialog #rv-keys { height: auto; color: $text-muted; }
    """

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.finished = False  # escape and the last vote may both ask to finish: save once

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll(id="rv-item"):
                yield Static("", id="rv-text")
            yield Label("a: A is better · b: B is better · t: tie · s: skip · escape: finish and save", id="rv-keys")

    def on_mount(self) -> None:
        self.show()

    def show(self) -> None:
        item = self.session.current()
        if item is None:
            self.action_finish()
            return
        prompt = "\n".join(f"[b]{t['role']}:[/] {escape(t['content'])}" for t in item["prompt"])
        self.query_one("#rv-text", Static).update(
            f"[b]{item['number']} of {item['total']}[/] (blind: A and B are drawn at random for each item)\n\n"
            f"{prompt}\n\n[dim]reference:[/] {escape(item['reference'])}\n\n"
            f"[b $accent]A:[/] {escape(item['a'])}\n\n[b $secondary]B:[/] {escape(item['b'])}")

    def action_vote(self, choice: str) -> None:
        self.session.vote(choice)
        self.show()

    def action_finish(self) -> None:
        if not self.is_attached or self.finished:
            return
        self.finished = True
        self.dismiss(self.session.save())


class EvaluateScreen(Pane):
    BINDINGS = [Binding("e", "evaluate", "evaluate"), Binding("s", "samples", "samples"),
                Binding("v", "review", "review")]
    DEFAULT_CSS = """
    EvaluateScreen #ev-runs { height: auto; max-height: 7; }
    EvaluateScreen #ev-form { height: auto; border-top: solid $accent; }
    EvaluateScreen #ev-form Label { padding: 1 1 0 1; }
    EvaluateScreen #ev-samples { width: 12; }
    EvaluateScreen #ev-judge { width: 1fr; }
    EvaluateScreen #ev-go { min-width: 12; width: auto; }
    EvaluateScreen #ev-progress-row { height: auto; }
    EvaluateScreen #ev-stage { width: 1fr; height: auto; padding: 0 1; }
    EvaluateScreen #ev-bar { width: auto; display: none; }
    EvaluateScreen #ev-bar Bar { width: 20; }
    EvaluateScreen #ev-bar.shown { display: block; }
    EvaluateScreen #ev-view { height: 1fr; min-height: 4; border-top: solid $accent; padding: 0 1; }
    EvaluateScreen #ev-report, EvaluateScreen #ev-examples { height: auto; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.runs: dict[str, dict] = {}
        self.order: list[str] = []
        self.working: str | None = None  # the run being evaluated
        self.report: dict | None = None  # the last report evaluate() returned (examples included)
        self.examples: dict[str, list[dict]] = {}  # per run, this session only
        self.progress_events = 0
        self.judging = False

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="ev-runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "state", "base model", "GGUF", "evaluated")
        yield table
        with Horizontal(id="ev-form"):
            yield Label("test samples")
            yield Input(str(DEFAULT_SAMPLES), type="integer", id="ev-samples")
            yield Label("judge")
            yield Input(placeholder="optional: model id, run id or .gguf", id="ev-judge")
            yield Button("Evaluate", id="ev-go", variant="primary")
        with Horizontal(id="ev-progress-row"):
            yield Label(HINT, id="ev-stage")
            yield ProgressBar(id="ev-bar", show_eta=False)
        with VerticalScroll(id="ev-view"):
            yield Static("", id="ev-report")
            yield Static("", id="ev-examples")

    def on_mount(self) -> None:
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#ev-runs", DataTable).focus()

    def refresh_data(self) -> None:
        self.call(load_runs, self.show_runs, group="list")

    def show_runs(self, rows: list[dict]) -> None:
        table = self.query_one("#ev-runs", DataTable)
        keep = self.selected()
        self.runs = {r["id"]: r for r in rows}
        self.order = [r["id"] for r in rows]
        table.clear()
        for r in rows:
            ev = r.get("eval")
            evaluated = f"{ev['samples']} samples" if ev else "-"
            table.add_row(r["id"], r["state"], r["base_model"], "f16" if r["gguf_f16"] else "-", evaluated,
                          key=r["id"])
        if not rows:
            self.stage(NO_RUNS)
            self.query_one("#ev-report", Static).update("")
            return
        if str(self.query_one("#ev-stage", Label).render()) == NO_RUNS:
            self.stage(HINT)
        if keep in self.runs:
            table.move_cursor(row=self.order.index(keep))
        self.show_run(self.selected())

    def selected(self) -> str | None:
        table = self.query_one("#ev-runs", DataTable)
        if not self.order or not 0 <= table.cursor_row < len(self.order):
            return None
        return self.order[table.cursor_row]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "ev-runs" and event.row_key is not None and event.row_key.value:
            self.show_run(event.row_key.value)

    def show_run(self, run_id: str | None) -> None:
        report = self.query_one("#ev-report", Static)
        examples = self.query_one("#ev-examples", Static)
        r = self.runs.get(run_id or "")
        if r is None:
            return
        if r.get("eval"):
            report.update(report_text(r["eval"], run_id))
        elif r["state"] != "finished":
            report.update(f"[b]{escape(run_id)}[/] is {r['state']}: only a finished run can be evaluated")
        elif not r["gguf_f16"]:
            report.update(f"[b]{escape(run_id)}[/] has no f16 GGUF yet: export it on the Export screen (key 8), "
                          "then press e here")
        else:
            report.update(f"[b]{escape(run_id)}[/] is not evaluated yet: e scores it and its base on the test "
                          "split")
        if self.examples.get(run_id):
            examples.update(examples_table(self.examples[run_id]))
        elif r.get("eval"):
            examples.update("[dim]test examples show after an evaluation in this session: eval.json keeps the "
                            "scores only (no dataset text leaves the vault)[/]")
        else:
            examples.update("")

    def stage(self, text: str) -> None:
        self.query_one("#ev-stage", Label).update(Content(text))

    # -- actions ---------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ev-go":
            self.action_evaluate()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in ("ev-samples", "ev-judge"):
            self.action_evaluate()

    def action_samples(self) -> None:
        self.query_one("#ev-samples", Input).focus()

    def action_evaluate(self) -> None:
        from appliance.errors import InvalidInput

        if self.working:
            raise InvalidInput(f"run {self.working} is being evaluated; wait for it to finish.")
        run_id = self.selected()
        if run_id is None:
            raise InvalidInput("there is no run to evaluate; train one on the Plan screen (key 5) first.")
        r = self.runs[run_id]
        if r["state"] != "finished":
            raise InvalidInput(f"run {run_id} is {r['state']}; only a finished run can be evaluated.")
        if not r["gguf_f16"]:
            raise InvalidInput(f"run {run_id} has no f16 GGUF; export it on the Export screen (key 8) first.")
        raw = self.query_one("#ev-samples", Input).value.strip()
        if not raw.isdigit() or int(raw) < 1:
            raise InvalidInput(f"the number of test samples must be a whole number of at least 1, not {raw!r}.")
        samples = int(raw)
        judge = self.query_one("#ev-judge", Input).value.strip() or None
        self.judging = judge is not None
        self.working = run_id
        self.progress_events = 0
        bar = self.query_one("#ev-bar", ProgressBar)
        bar.update(total=None, progress=0)
        bar.add_class("shown")
        self.stage(f"evaluating {run_id} on {samples} test samples…")

        def emit(e) -> None:
            self.app.call_from_thread(self.on_eval_event, e)

        def job():
            require_unlocked()  # the test split is read from the vault
            from appliance import data, runs
            from appliance.evaluate import evaluate

            report = evaluate(run_id, samples=samples, judge=judge, emit=emit)
            records = [{"messages": c} for c in data.heldout(runs.load_recipe(run_id), samples, report["split"])]
            return run_id, report, pair_examples(report, records)

        self.call(job, self.evaluated, group="evaluate")

    def on_eval_event(self, e) -> None:
        bar = self.query_one("#ev-bar", ProgressBar)
        if e.type == "progress" and {"model", "done", "total"} <= set(e.data):
            total, model = int(e.data["total"]), e.data["model"]
            phases = ("base", "tuned", "judge") if self.judging else ("base", "tuned")
            if model not in phases:  # the forgetting check's items: a stage of their own
                self.stage(f"{model}: {e.data['done']}/{total} general-ability items")
                return
            self.progress_events += 1
            done = int(e.data["done"]) + total * phases.index(model)
            bar.update(total=len(phases) * total, progress=done)
            what = "pairs judged in both orders" if model == "judge" else "test prompts answered"
            self.stage(f"{model}{'' if model == 'judge' else ' model'}: {e.data['done']}/{total} {what}")
        elif e.type == "stage" and e.message:
            self.stage(e.message)
        elif e.type == "warning" and e.message:
            self.stage(f"warning: {e.message}")

    def evaluated(self, result: tuple) -> None:
        run_id, report, examples = result
        self.working = None
        self.report = report
        self.examples[run_id] = examples
        bar = self.query_one("#ev-bar", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)
        verdict = "beats" if report.get("tuned_beats_base") else "does not beat"
        self.stage(f"evaluated {run_id} on {report['samples']} samples: tuned {verdict} base")
        if run_id in self.runs:  # shown at once; the list's reload brings eval.json
            self.runs[run_id]["eval"] = {k: v for k, v in report.items() if k != "examples"}
            if self.selected() == run_id:
                self.show_run(run_id)
        self.refresh_data()

    def action_review(self) -> None:
        """The blind A/B review of the selected run's last evaluation (its answers are read from the vault)."""
        import getpass

        from appliance.errors import InvalidInput

        run_id = self.selected()
        if run_id is None or not self.runs[run_id].get("eval"):
            raise InvalidInput("there is no evaluation to review; evaluate the run first (e).")
        if self.working:
            raise InvalidInput(f"run {self.working} is being evaluated; review it when the evaluation has finished.")

        def job():
            require_unlocked()
            from appliance.evaluate.review import Review

            return Review(run_id, getpass.getuser())

        def start(session) -> None:
            def reviewed(tally: dict | None) -> None:
                if tally:
                    self.stage(f"review saved: tuned better {tally['tuned_wins']}, tie {tally['ties']}, base better "
                               f"{tally['base_wins']} ({tally['reviewer']}, in eval.json and the audit log)")
                self.refresh_data()

            self.app.push_screen(ReviewDialog(session), reviewed)

        self.call(job, start, group="review")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "evaluate" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.working = None
            self.stage("evaluation failed" if event.state == WorkerState.ERROR else "evaluation cancelled")
            # (Pane's handler, called too, shows the error dialog)
