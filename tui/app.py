"""The application shell: a tab per screen, a footer of bindings, the command palette, help, and error dialogs.

``ApplianceApp`` is built with what it reads from injectable (``simulate``, and for tests a hardware sampler and
the doctor's checks), so tests can give it a fixed machine. Everything it shows comes from ``appliance``'s public
functions, called in worker threads: the first screen paints before any of them has returned.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Static, TabbedContent, TabPane

from .errors import ErrorDialog, sentence
from .screens.base import Pane
from .screens.dashboard import Dashboard

# (tab id, title, key, what it is for), in the order of the pipeline: the tabs, the keys, the command palette and
# the help. A screen's class is tui.screens.<tab>.<Tab>Screen, imported when the tab is first shown.
SCREENS = (
    ("dashboard", "Home", "1", "what the workspace holds, and the next step of the pipeline"),
    ("hardware", "Hardware", "2", "detected hardware; live utilisation and memory per device"),
    ("models", "Models", "3", "imported base models and their manifests; import a .gguf file or an HF folder"),
    ("datasets", "Data", "4", "the vault: create or unlock it; import, browse, export, crypto-shred datasets"),
    ("plan", "Plan", "5", "a recipe's memory plan per device; edit the knobs; start training"),
    ("train", "Train", "6", "runs; follow one live (loss, learning rate, tokens/s, memory, ETA); stop, resume"),
    ("evaluate", "Eval", "7", "score the tuned model against its base on the held-out split"),
    ("export", "Export", "8", "merge and export GGUF files; sizes, expected quality, the parity checks"),
    ("chat", "Chat", "9", "chat with a GGUF through llama.cpp; base and tuned side by side"),
    ("serve", "Serve", "w", "an OpenAI-compatible endpoint: start, stop, its address, API keys, tenants, live counts"),
    ("audit", "Audit", "0", "the audit log, filtered by event and time; verify it"),
    ("doctor", "Doctor", "g", "the air-gap status: egress guard, offline switches, interfaces, routes; hardware"),
)

# Keys that belong to no one screen (each screen's own keys come from its BINDINGS).
KEYS = [
    ("1-9, w, 0, g", "show a screen (the tabs, in the order of the pipeline; the mouse works too)"),
    ("alt+1 … alt+g, alt+w", "the same from inside a text field, where the plain keys type"),
    ("r", "reload the current screen from the workspace"),
    ("tab / shift+tab", "move between widgets (tabs, tables, inputs, buttons)"),
    ("enter", "choose the selected row; press the focused button"),
    ("ctrl+p", "command palette: search screens and commands"),
    ("?", "this help"),
    ("escape", "close a dialog"),
    ("q", "quit (a training run keeps running)"),
]


def screen_class(tab: str) -> type:
    """The screen of a tab, importing its module now (only the dashboard's is imported at start)."""
    import importlib

    if tab == "dashboard":
        return Dashboard
    return getattr(importlib.import_module(f"tui.screens.{tab}"), f"{tab.capitalize()}Screen")


def help_rows() -> list[tuple[str, str]]:
    rows = list(KEYS)
    for tab, title, _, _ in SCREENS:
        for b in getattr(screen_class(tab), "BINDINGS", []):
            if isinstance(b, Binding) and b.description:
                rows.append((b.key_display or b.key, f"{title}: {b.description}"))
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "close"), Binding("question_mark", "close", "close", show=False),
                Binding("q", "close", "close", show=False)]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 80; max-width: 95%; height: auto; max-height: 90%; border: thick $accent;
                            background: $surface; padding: 0 1; }
    HelpScreen DataTable { height: auto; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]keys[/]  (the mouse works too: click a tab, a row or a button)")
            table: DataTable = DataTable(show_cursor=False)
            table.add_columns("key", "does")
            for key, does in help_rows():
                table.add_row(key, does)
            yield table

    def action_close(self) -> None:
        self.dismiss()


class ApplianceApp(App):
    TITLE = "appliance"
    SUB_TITLE = "offline fine-tuning"
    # Twelve tabs fit in 80 columns with one space between titles (Textual's default padding puts two).
    CSS = """
    Tabs Tab { padding: 0 0 0 1; }
    """
    BINDINGS = [
        # One footer entry for the number keys (the tabs name the screens; `?` lists them): at 80 columns the
        # footer keeps room for the current screen's own keys.
        *[Binding(key, f"show('{tab}')", "screens" if i == 0 else title, show=i == 0,
                  key_display="1-0" if i == 0 else None)
          for i, (tab, title, key, _) in enumerate(SCREENS)],
        # The same with alt, from anywhere: a text field (Chat's message, a form) takes the plain digits.
        *[Binding(f"alt+{key}", f"show('{tab}')", title, show=False, priority=True) for tab, title, key, _ in SCREENS],
        Binding("r", "reload", "reload", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, simulate: str | None = None, *, sampler: Callable[[], dict] | None = None,
                 doctor: Callable[[], list] | None = None, sample_interval: float = 1.0, kdf: str | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.simulate = simulate
        self._sampler = sampler
        self._doctor = doctor
        self._sample_interval = sample_interval
        self._kdf = kdf  # a new vault's KDF (None: the keyring's default); tests pick a fast one
        self._built: set[str] = set()
        # Textual's Tabs activate their first tab on mount, after the app has started taking keys: a tab shown
        # before that would be switched back to Home. A switch asked for before the tabs have announced their
        # first activation waits for it (see on_tabbed_content_tab_activated).
        self._tabs_ready = False
        self._pending_tab: str | None = None
        self.asked_tab: str | None = None  # the screen last asked for with its key (or the Home button)
        if simulate:
            self.sub_title = f"offline fine-tuning · hardware simulated: {simulate}"

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="dashboard"):
            with TabPane(SCREENS[0][1], id="dashboard"):
                yield Dashboard()
            # The other screens are built when first shown: the first paint waits for none of their widgets,
            # modules or workers (see bench/tui_startup.py).
            for tab, title, _, _ in SCREENS[1:]:
                yield TabPane(title, id=tab)
        yield Footer()

    def build(self, tab: str) -> Pane:
        # What the app was given that a screen needs (a simulated profile; tests' fixed hardware and checks).
        args = {"hardware": (self.simulate, self._sampler, self._sample_interval), "doctor": (self.simulate, self._doctor),
                "datasets": (self._kdf,), "plan": (self.simulate,)}.get(tab, ())
        return screen_class(tab)(*args)

    async def ensure_built(self, tab: str) -> None:
        if tab == "dashboard" or tab in self._built:
            return
        self._built.add(tab)
        await self.query_one(TabbedContent).get_pane(tab).mount(self.build(tab))

    # -- actions ---------------------------------------------------------------

    async def action_show(self, tab: str) -> None:
        # Said before the await below: while the screen is built, the Home screen's summary may arrive and must
        # not take the focus (and with it, once its focus message lands, the tab) back.
        self.asked_tab = tab
        await self.ensure_built(tab)
        if not self._tabs_ready:
            self._pending_tab = tab
            return
        self.query_one(TabbedContent).active = tab
        self.focus_pane()
        # A start-up activation of the first tab that Textual delivers late would undo the switch: hold it.
        self.call_after_refresh(self._hold, tab)

    def _hold(self, tab: str) -> None:
        tabs = self.query_one(TabbedContent)
        if self.asked_tab == tab and tabs.active == "dashboard" != tab:
            tabs.active = tab
            self.focus_pane()

    def focus_pane(self) -> None:
        pane = self.current_pane()
        if pane is not None:
            pane.focus_default()

    def action_reload(self) -> None:
        pane = self.current_pane()
        if pane is not None:
            pane.refresh_data()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def current_pane(self) -> Pane | None:
        tabs = self.query_one(TabbedContent)
        found = tabs.get_pane(tabs.active).query(Pane) if tabs.active else []
        return found.first() if found else None

    async def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if not self._tabs_ready:  # the tabs' own first activation: now a switch sticks
            self._tabs_ready = True
            pending, self._pending_tab = self._pending_tab, None
            if pending is not None and pending != event.pane.id:
                # Shown as if its key were pressed now: the same path, after this activation is handled.
                self.call_later(self.run_action, f"show('{pending}')")
        # The dashboard's counts change when the user acts elsewhere (a CLI in another terminal): re-read on show.
        if event.pane.id == "dashboard":
            self.call_after_refresh(self.query_one(Dashboard).refresh_data)  # (also sent as the app starts)
        else:  # a tab clicked with the mouse or reached with the arrow keys
            await self.ensure_built(event.pane.id)
            # (Also sent, later, for a tab shown with its key: keep the focus if the user has moved it within.)
            if self.focused is None or event.pane not in self.focused.ancestors:
                self.focus_pane()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab, title, key, what in SCREENS:
            yield SystemCommand(f"Show {title}", f"{what} (key {key})",
                                lambda tab=tab: self.run_action(f"show('{tab}')"))
        yield SystemCommand("Reload", "re-read the current screen from the workspace (key r)", self.action_reload)
        yield SystemCommand("Keys", "the key bindings (key ?)", self.action_help)

    # -- errors ----------------------------------------------------------------

    def show_error(self, error: BaseException) -> None:
        """One sentence in a dialog; the details of a bug stay off the screen (APPLIANCE_DEBUG=1 keeps them in
        Textual's log)."""
        self.log.error(repr(error))
        self.push_screen(ErrorDialog(sentence(error)))


def run(simulate: str | None = None) -> int:
    ApplianceApp(simulate=simulate).run()
    return 0
