"""Chat: a tuned model's exported GGUF through llama.cpp, streaming, with its base model side by side.

What can be chosen: a run with exported GGUF files (and which quant file), optionally compared with the run's base
model (converted to GGUF on first use, once), or an imported model (or the embedded default) alone. The sampling
settings are read at each message. Only the engine (jobs run one at a time in a worker thread) touches llama.cpp:
it opens a model with the first message after a selection (``appliance.infer.Chat``), keeps it open between
turns, and closes it when the selection changes, when the user leaves the Chat tab, and when the app exits; each
close records the audit entry ``chat``. The two models answer one after the other (llama.cpp uses every core).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TabbedContent

from .base import Pane

FLUSH_S = 0.05  # streamed text reaches a panel at most this often (a fast model would flood the UI otherwise)
STACK_BELOW = 72  # columns: narrower than this, the two panels are stacked
SLOTS = ("tuned", "base")


# -- what can be chosen -------------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One entry of the model picker."""

    key: str  # "run:ID", "model:ID" or "gguf:PATH"
    label: str
    model: str  # what appliance.infer.resolve takes: a model id or a .gguf path
    quants: dict[str, str] = field(default_factory=dict)  # run: quant -> its GGUF file
    quant: str | None = None  # the preferred one (what `appliance ask RUN` loads)
    base: str | None = None  # run: its base model id
    system: str | None = None  # run: the system prompt it was trained with


def catalog() -> list[Choice]:
    """Runs with exported GGUF files (newest first), then imported models, then the embedded default."""
    from appliance import infer, models, runs

    out = []
    for r in reversed(runs.list_runs()):
        gguf = Path(r["path"]) / "gguf"
        files = {p.name[len("model-"):-len(".gguf")]: str(p) for p in sorted(gguf.glob("model-*.gguf"))}
        if not files:
            continue
        quant = next((q for q in infer.PREFERRED if q in files), sorted(files)[0])
        try:
            system = runs.load_recipe(r["id"]).system_prompt
        except Exception:  # an unreadable recipe leaves the system prompt empty; the run can still be chatted with
            system = None
        out.append(Choice(f"run:{r['id']}", f"{r['id']} (tuned)", files[quant], files, quant, r.get("base_model"),
                          system))
    for m in models.list_models():
        out.append(Choice(f"model:{m['id']}", f"{m['id']} (model)", m["id"]))
    try:
        embedded = models.default_gguf()
        out.append(Choice(f"gguf:{embedded}", "SmolLM2-135M (embedded default)", str(embedded)))
    except Exception:  # not installed: not offered
        pass
    return out


def needs_conversion(model_id: str) -> bool:
    """Whether the base model's GGUF is still to be made (appliance.convert.base_gguf keeps it there)."""
    from appliance.workspace import folder

    return not (folder("models") / f".gguf-{model_id}" / "model-f16.gguf").is_file()


# -- the sampling form -------------------------------------------------------------------------------------------

# (input id, label, name in error sentences, parse, tooltip)
KNOBS = (
    ("temperature", "temp", "temperature", float, "temperature: 0 is greedy (the same answer every time)"),
    ("top-p", "top-p", "top-p", float, "top-p: sample from the likeliest tokens that make up this share"),
    ("top-k", "top-k", "top-k", int, "top-k: sample from the k likeliest tokens (0: all)"),
    ("max-tokens", "max", "max tokens", int, "max tokens: the longest answer"),
    ("repeat-penalty", "rep", "repeat penalty", float, "repeat penalty: above 1 discourages repeating (1: none)"),
    ("seed", "seed", "seed", int, "seed: repeat a sampled answer with the same seed (empty: one per turn)"),
)


def parse_settings(values: dict[str, str], system: str) -> dict:
    """The form's text -> Chat's settings; a bad value is one sentence naming its field."""
    from appliance.errors import InvalidInput
    from appliance.infer import check_sampling

    out: dict[str, Any] = {}
    for key, _, name, kind, _ in KNOBS:
        text = values[key].strip()
        if key == "seed" and not text:
            out["seed"] = None
            continue
        try:
            out[key.replace("-", "_")] = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise InvalidInput(f"{name} must be {what}; got {text!r}.") from None
    check_sampling(**out)
    out["system"] = system.strip() or None
    return out


def stats_line(result: dict) -> str:
    rate = f" · {result['tokens_per_s']:.1f} tok/s" if result.get("tokens_per_s") else ""
    why = {"eog": "done", "max_tokens": "max tokens reached", "user": "stopped"}.get(result["stopped"],
                                                                                      result["stopped"])
    return f"{result['prompt_tokens']} prompt + {result['completion_tokens']} tokens{rate} · {why}"


class Toggle(Checkbox):
    """A checkbox whose mark says its state in a character, not only in a colour (NO_COLOR renders greys)."""

    @property
    def BUTTON_INNER(self) -> str:  # type: ignore[override]
        return "X" if self.value else " "


# -- a transcript -------------------------------------------------------------------------------------------------

class Transcript(VerticalScroll):
    """One model's side of the conversation: the user's turns, the streamed answers, the figures of each."""

    DEFAULT_CSS = """
    Transcript { width: 1fr; height: 1fr; border: round $primary; padding: 0 1; border-title-color: $text;
                 scrollbar-size-vertical: 1; }
    Transcript:focus { border: round $accent; }
    Transcript > Static { height: auto; }
    Transcript > .user { text-style: bold; }
    Transcript > .later { margin-top: 1; }
    Transcript > .stats, Transcript > .note { color: $text-muted; text-style: italic; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.answer: Static | None = None
        self.text = ""  # of the answer being streamed
        self.updates = 0  # batches of streamed text received (the tests count them)
        self.turns = 0

    def clear(self) -> None:
        self.remove_children()
        self.answer, self.text, self.updates, self.turns = None, "", 0, 0

    def _add(self, text: str, classes: str) -> Static:
        widget = Static(text, markup=False, classes=classes)
        self.mount(widget)
        self.scroll_end(animate=False)
        return widget

    def user(self, text: str) -> None:
        self._add(f"you: {text}", "user later" if self.turns else "user")
        self.turns += 1

    def start(self) -> None:
        self.text = ""
        self.answer = self._add("…", "answer")

    def append(self, text: str) -> None:
        if self.answer is None:
            self.start()
        self.text += text
        self.updates += 1
        assert self.answer is not None
        self.answer.update(self.text.lstrip())  # (a tokenizer's leading space)
        self.scroll_end(animate=False)

    def finish(self, result: dict) -> None:
        if self.answer is not None and not self.text:
            self.answer.update("(no text)")
        self.answer = None
        self._add(stats_line(result), "stats")

    def note(self, text: str) -> None:
        if self.answer is not None and not self.text:
            self.answer.remove()
        self.answer = None
        self._add(text, "note")


# -- the engine: the only code that touches llama.cpp -------------------------------------------------------------

class Engine:
    """Jobs run one at a time, in order, in a worker thread that lives while there are jobs (so the app's workers
    go idle between messages). The open models (``appliance.infer.Chat``) stay open between jobs."""

    def __init__(self, pane: "ChatScreen") -> None:
        self.pane = pane
        self.jobs: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.running = False
        self.closing = False
        self.stop = threading.Event()
        self.wanted: dict[str, str] = {}  # slot -> model (what resolve takes), in answering order
        self.chats: dict[str, Any] = {}  # slot -> an open appliance.infer.Chat
        self.history: dict[str, list[dict]] = {}  # slot -> the conversation of a model closed on leaving the tab
        self.clock: Callable[[], float] = time.monotonic  # paces the streamed batches (FLUSH_S); tests inject one

    # UI thread
    def submit(self, fn: Callable, *args: Any) -> None:
        with self.lock:
            if self.closing:
                return
            self.jobs.append((fn, args))
            if self.running:
                return
            self.running = True
        self.pane.run_worker(self.drain, thread=True, group="engine", exit_on_error=False, name="ChatScreen.engine")

    def drain(self) -> None:
        while True:
            with self.lock:
                if not self.jobs or self.closing:
                    self.running = False
                    return
                fn, args = self.jobs.popleft()
            try:
                fn(*args)
            except Exception as error:  # one job's failure is a dialog; the engine carries on
                self.ui(self.pane.failed, error)

    def ui(self, fn: Callable, *args: Any) -> None:
        """Run ``fn`` on the UI thread and wait for it (the wait paces the stream)."""
        if self.closing:
            return
        try:
            self.pane.app.call_from_thread(fn, *args)
        except RuntimeError:  # the app has stopped
            pass

    # engine thread
    def select(self, wanted: dict[str, str]) -> None:
        for slot in list(self.chats):
            if wanted.get(slot) != self.wanted.get(slot):
                self.close(slot)
        self.wanted = dict(wanted)
        self.history.clear()
        for chat in self.chats.values():
            chat.reset()

    def close(self, slot: str) -> None:
        chat = self.chats.pop(slot, None)
        if chat is not None:
            self.history[slot] = chat.messages
            chat.__exit__(None, None, None)  # closes the model; records the audit entry

    def release(self) -> None:
        for slot in list(self.chats):
            self.close(slot)

    def reset(self) -> None:
        self.history.clear()
        for chat in self.chats.values():
            chat.reset()

    def open(self, slot: str, settings: dict) -> Any:
        from appliance.errors import InvalidInput
        from appliance.infer import Chat

        chat = self.chats.get(slot)
        if chat is None:
            model = self.wanted[slot]
            if slot == "base" and needs_conversion(model):
                self.ui(self.pane.status, f"converting the base model {model} to GGUF: the first time only, "
                                          "and it can take minutes…")
            else:
                self.ui(self.pane.status, f"loading {Path(model).name if model.endswith('.gguf') else model}…")
            chat = Chat(model).__enter__()
            self.chats[slot] = chat
            if self.closing:  # the app exited meanwhile (a conversion outlasts its wait): close it here
                self.shutdown()
                raise InvalidInput("the app is closing.")
            if slot in self.history:
                chat.messages = self.history.pop(slot)
            self.ui(self.pane.loaded)
        chat.system = settings["system"]
        for knob in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed"):
            setattr(chat, knob, settings[knob])
        return chat

    def say(self, epoch: int, text: str, settings: dict) -> None:
        try:
            for slot in SLOTS:
                if slot not in self.wanted:
                    continue
                if self.stop.is_set():
                    self.ui(self.pane.skipped, epoch, slot)
                    continue
                chat = self.open(slot, settings)
                self.ui(self.pane.started, epoch, slot)
                pending: list[str] = []
                last = 0.0

                def flush() -> None:
                    nonlocal last
                    if pending:
                        batch = "".join(pending)
                        pending.clear()
                        self.ui(self.pane.streamed, epoch, slot, batch)
                    last = self.clock()

                def on_text(piece: str) -> None:
                    pending.append(piece)
                    if self.clock() - last >= FLUSH_S:
                        flush()

                result = chat.say(text, on_text=on_text, should_stop=self.stop.is_set)
                flush()
                self.ui(self.pane.answered, epoch, slot, result)
        finally:
            self.ui(self.pane.idle)

    def shutdown(self) -> None:
        """Close every model (from the UI's exit, once no job runs)."""
        for slot in list(self.chats):
            chat = self.chats.pop(slot)
            chat.__exit__(None, None, None)


# -- the screen ---------------------------------------------------------------------------------------------------

class ChatScreen(Pane):
    BINDINGS = [Binding("escape", "stop", "stop"), Binding("ctrl+n", "new_chat", "new chat"),
                Binding("ctrl+b", "toggle_compare", "vs base")]
    DEFAULT_CSS = """
    ChatScreen > Horizontal { height: 1; }
    ChatScreen > #chat-system { margin: 1 0; }
    ChatScreen Label { width: auto; padding: 0 1 0 0; color: $text-muted; }
    ChatScreen #model { width: 1fr; }
    ChatScreen #quant { width: 14; margin: 0 1; }
    ChatScreen #compare { width: auto; }
    ChatScreen #system { width: 1fr; }
    ChatScreen #chat-knobs Input { width: 1fr; max-width: 10; margin: 0 2 0 0; }
    ChatScreen #panels { height: 1fr; }
    ChatScreen #panels.stacked { layout: vertical; }
    ChatScreen #base.hidden { display: none; }
    ChatScreen #chat-status { height: 1; color: $text-muted; }
    ChatScreen #chat-ask { height: 1; margin: 0; }
    ChatScreen #prompt { width: 1fr; }
    ChatScreen #chat-ask Button { margin: 0 0 0 1; min-width: 6; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.engine = Engine(self)
        self.choices: dict[str, Choice] = {}
        self.busy = False
        self.epoch = 0  # a new chat or selection makes what a running answer still sends stale
        self.engine_wanted: dict[str, str] = {}  # slot -> model, as last given to the engine
        self.last_results: dict[str, dict] = {}  # slot -> its last answer's figures
        self.shown = True  # the Chat tab is the active one
        self.names = {"tuned": "tuned", "base": "base"}  # in the status line

    def compose(self) -> ComposeResult:
        from appliance.infer import REPEAT_PENALTY, TOP_K, TOP_P

        defaults = {"temperature": "0.7", "top-p": str(TOP_P), "top-k": str(TOP_K), "max-tokens": "512",
                    "repeat-penalty": str(REPEAT_PENALTY), "seed": ""}
        with Horizontal(id="chat-pick"):
            yield Select([], prompt="model: reading the workspace…", id="model", compact=True)
            yield Select([], prompt="quant", id="quant", compact=True, disabled=True)
            yield Toggle("compare with base", id="compare", compact=True, disabled=True,
                         tooltip="compare with the run's base model, side by side (ctrl+b)")
        with Horizontal(id="chat-system"):
            yield Label("system")
            yield Input(placeholder="system prompt (none)", id="system", compact=True)
        with Horizontal(id="chat-knobs"):
            for key, label, _, kind, tip in KNOBS:
                yield Label(label)
                yield Input(defaults[key], placeholder="auto" if key == "seed" else "", id=key, compact=True,
                            type="integer" if kind is int else "number", valid_empty=key == "seed", tooltip=tip)
        with Horizontal(id="panels"):
            yield Transcript(id="tuned")
            yield Transcript(id="base", classes="hidden")
        yield Static("", id="chat-status", markup=False)
        with Horizontal(id="chat-ask"):
            yield Input(placeholder="message (Enter sends; escape stops; ctrl+n new chat)", id="prompt", compact=True)
            yield Button("Send", id="send", variant="primary", compact=True)
            yield Button("Stop", id="stop", variant="error", compact=True, disabled=True)
            yield Button("New", id="new", compact=True)

    def on_mount(self) -> None:
        self.watch(self.app.query_one(TabbedContent), "active", self.tab_changed, init=False)
        self.refresh_data()

    def focus_default(self) -> None:
        self.query_one("#prompt", Input).focus()

    def refresh_data(self) -> None:
        self.call(catalog, self.show_catalog, group="catalog")

    # -- choosing ---------------------------------------------------------------------------------------------

    def show_catalog(self, choices: list[Choice]) -> None:
        self.choices = {c.key: c for c in choices}
        picker = self.query_one("#model", Select)
        current = picker.value
        picker.set_options([(c.label, c.key) for c in choices])
        picker.prompt = "model: choose one" if choices else "model: none yet"
        if not choices:
            self.status("nothing to chat with yet: import a model (Models, key 3), or train and export a run")
            return
        if current in self.choices:
            picker.value = current
        else:
            picker.value = choices[0].key  # the newest exported run; Select.Changed applies it

    def choice(self) -> Choice | None:
        value = self.query_one("#model", Select).value
        return self.choices.get(value) if isinstance(value, str) else None

    def on_select_changed(self, event: Select.Changed) -> None:
        choice = self.choice()
        if event.select.id == "model":
            quant = self.query_one("#quant", Select)
            compare = self.query_one("#compare", Checkbox)
            if choice is not None and choice.quants:
                quant.set_options([(q, q) for q in choice.quants])
                quant.value = choice.quant
                quant.disabled = False
                compare.disabled = not choice.base
            else:
                quant.set_options([])
                quant.disabled = True
                with compare.prevent(Checkbox.Changed):
                    compare.value = False
                compare.disabled = True
            self.query_one("#system", Input).value = (choice.system or "") if choice else ""
        self.apply_selection()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.apply_selection()

    def action_toggle_compare(self) -> None:
        compare = self.query_one("#compare", Checkbox)
        if compare.disabled:
            self.notify("comparing needs a tuned run: choose one of the runs", severity="warning")
            return
        compare.value = not compare.value

    def wanted(self) -> dict[str, str]:
        choice = self.choice()
        if choice is None:
            return {}
        quant = self.query_one("#quant", Select).value
        out = {"tuned": choice.quants.get(quant, choice.model) if isinstance(quant, str) else choice.model}
        if choice.base and self.query_one("#compare", Checkbox).value:
            out["base"] = choice.base
        return out

    def apply_selection(self) -> None:
        wanted = self.wanted()
        if wanted == self.engine_wanted:
            return
        self.engine_wanted = wanted
        self.stop_answer()
        self.engine.submit(self.engine.select, wanted)
        self.clear_panels()
        choice = self.choice()
        tuned, base = self.query_one("#tuned", Transcript), self.query_one("#base", Transcript)
        if choice is None:
            tuned.border_title = ""
            return
        if choice.quants:
            tuned.border_title = f"tuned · {Path(wanted['tuned']).stem.removeprefix('model-')}"
        else:
            tuned.border_title = choice.label
        base.border_title = f"base · {choice.base}" if choice.base else "base"
        base.set_class("base" not in wanted, "hidden")
        self.names = {"tuned": "tuned" if choice.quants else "model", "base": "base"}
        what = f"{choice.key.split(':', 1)[1]} {Path(wanted['tuned']).name}" if choice.quants else choice.label
        if "base" in wanted:
            what += f" and its base model {wanted['base']}"
        note = ""
        if "base" in wanted and needs_conversion(wanted["base"]):
            note = "; the base model is converted to GGUF with the first message (once; it can take minutes)"
        self.status(f"{what}: loaded with the first message{note}")

    # -- talking ----------------------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "prompt":
            self.send()
        elif event.input.id in {k for k, *_ in KNOBS} | {"system"}:
            self.query_one("#prompt", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "send":
            self.send()
        elif event.button.id == "stop":
            self.action_stop()
        elif event.button.id == "new":
            self.action_new_chat()

    def settings(self) -> dict:
        values = {key: self.query_one(f"#{key}", Input).value for key, *_ in KNOBS}
        return parse_settings(values, self.query_one("#system", Input).value)

    def send(self) -> None:
        from appliance.errors import InvalidInput

        prompt = self.query_one("#prompt", Input)
        text = prompt.value.strip()
        if not text:
            return
        if self.busy:
            self.notify("still answering: escape stops the answer", severity="warning")
            return
        if not self.engine_wanted:
            raise InvalidInput("choose a model to chat with first (the model list at the top).")
        settings = self.settings()
        prompt.value = ""
        self.last_results = {}
        for slot in self.engine_wanted:
            self.query_one(f"#{slot}", Transcript).user(text)
        self.set_busy(True)
        self.status("asking " + " then ".join(self.names[slot] for slot in self.engine_wanted) + "…")
        self.engine.stop.clear()
        self.engine.submit(self.engine.say, self.epoch, text, settings)

    def stop_answer(self) -> None:
        if self.busy:
            self.engine.stop.set()

    def action_stop(self) -> None:
        if self.busy:
            self.engine.stop.set()
            self.status("stopping…")

    def action_new_chat(self) -> None:
        self.stop_answer()
        self.engine.submit(self.engine.reset)
        self.clear_panels()
        self.status("new conversation")
        self.focus_default()

    def clear_panels(self) -> None:
        self.epoch += 1
        self.last_results = {}
        for slot in SLOTS:
            self.query_one(f"#{slot}", Transcript).clear()

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.query_one("#send", Button).disabled = busy
        self.query_one("#stop", Button).disabled = not busy

    # -- what the engine reports (UI thread) -----------------------------------------------------------------

    def panel(self, epoch: int, slot: str) -> Transcript | None:
        if epoch != self.epoch or not self.is_attached:
            return None
        return self.query_one(f"#{slot}", Transcript)

    def status(self, text: str) -> None:
        if self.is_attached:
            self.query_one("#chat-status", Static).update(text)

    def loaded(self) -> None:
        # llama.cpp silences the terminal while it loads a model (file descriptor 2, where Textual draws too):
        # whatever was drawn meanwhile is lost, so draw the whole screen again.
        self.app.refresh()

    def started(self, epoch: int, slot: str) -> None:
        self.status(f"{self.names[slot]}: answering… (escape stops it)")
        if (p := self.panel(epoch, slot)) is not None:
            p.start()

    def streamed(self, epoch: int, slot: str, text: str) -> None:
        if (p := self.panel(epoch, slot)) is not None:
            p.append(text)

    def answered(self, epoch: int, slot: str, result: dict) -> None:
        if (p := self.panel(epoch, slot)) is not None:
            self.last_results[slot] = result
            p.finish(result)

    def skipped(self, epoch: int, slot: str) -> None:
        if (p := self.panel(epoch, slot)) is not None:
            p.note("(not asked: stopped)")

    def idle(self) -> None:
        if self.is_attached:
            self.set_busy(False)
            done = []
            for slot, r in self.last_results.items():
                rate = f", {r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else ""
                done.append(f"{self.names[slot]}: {r['completion_tokens']} tokens{rate}")
            stopped = self.engine.stop.is_set()
            self.status(" · ".join(done) + (" (stopped)" if stopped else "") if done else
                        "stopped" if stopped else "")

    def failed(self, error: BaseException) -> None:
        if self.is_attached:
            self.status("failed: see the message")
            for slot in SLOTS:
                transcript = self.query_one(f"#{slot}", Transcript)
                if transcript.answer is not None:
                    transcript.note("(failed: see the message)")
        self.app.show_error(error)

    # -- leaving ----------------------------------------------------------------------------------------------

    def tab_changed(self, active: str) -> None:
        # The models' memory goes back while another screen is shown (training may need it); the conversation
        # stays, and the models load again with the next message.
        was, self.shown = self.shown, active == "chat"
        if was and not self.shown:
            self.engine.submit(self.engine.release)

    def on_resize(self, event: events.Resize) -> None:
        self.query_one("#panels").set_class(event.size.width < STACK_BELOW, "stacked")

    async def on_unmount(self) -> None:
        engine = self.engine
        with engine.lock:
            engine.closing = True  # no further job starts; the running one ends at its next token
            engine.jobs.clear()
        engine.stop.set()
        for _ in range(600):  # 30 s at most (a base model being converted cannot be interrupted)
            if not engine.running:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.shutdown)
