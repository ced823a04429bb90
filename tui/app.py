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

# (tab id, title, key, what it is for): the order of the tabs, the number keys and the command palette.
SCREENS = (
    ("dashboard", "Dashboard", "1", "what the workspace holds and the next step"),
    ("hardware", "Hardware", "2", "detected hardware; live RAM and GPU memory"),
    ("train", "Train", "3", "runs; follow one live (loss, tokens/s, memory); stop it"),
    ("audit", "Audit", "4", "the audit log, filtered by event; verify it"),
    ("doctor", "Doctor", "5", "air-gap, environment, vault and hardware checks"),
    ("models", "Models", "6", "imported models and their manifests; import a .gguf file or an HF folder"),
    ("datasets", "Datasets", "7", "the vault: create or unlock it; import, browse, crypto-shred datasets"),
    ("plan", "Plan", "8", "a recipe's memory plan per device; start training it"),
)

KEYS = [(key, f"{title}: {what}") for _, title, key, what in SCREENS] + [
    ("r", "reload the current screen from the workspace"),
    ("tab / shift+tab", "move between widgets (tabs, tables, inputs, buttons)"),
    ("enter", "follow the selected run (Train); browse a dataset (Datasets); press a focused button"),
    ("i", "import: a model (Models), a dataset file (Datasets)"),
    ("b / d / l", "Datasets: browse the selected dataset / crypto-shred it (asks first) / lock the vault"),
    ("p / t", "Plan: plan the recipe / train it on this machine (plans first, as `appliance train`)"),
    ("ctrl+p", "command palette: search screens and commands"),
    ("?", "this help"),
    ("escape", "close a dialog"),
    ("q", "quit (a training run keeps running)"),
]


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
            for key, does in KEYS:
                table.add_row(key, does)
            yield table

    def action_close(self) -> None:
        self.dismiss()


class ApplianceApp(App):
    TITLE = "appliance"
    SUB_TITLE = "offline fine-tuning"
    BINDINGS = [
        # One footer entry for the number keys (the tabs name the screens; `?` lists them): at 80 columns the
        # footer keeps room for the current screen's own keys.
        *[Binding(key, f"show('{tab}')", "screens" if i == 0 else title, show=i == 0,
                  key_display=f"1-{len(SCREENS)}" if i == 0 else None)
          for i, (tab, title, key, _) in enumerate(SCREENS)],
        Binding("r", "reload", "reload"),
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
        if simulate:
            self.sub_title = f"offline fine-tuning · hardware simulated: {simulate}"

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="dashboard"):
            with TabPane("Dashboard", id="dashboard"):
                yield Dashboard()
            # The other screens are built when first shown: the first paint waits for none of their widgets,
            # modules or workers (see bench/tui_startup.py).
            for tab, title, _, _ in SCREENS[1:]:
                yield TabPane(title, id=tab)
        yield Footer()

    def build(self, tab: str) -> Pane:
        if tab == "hardware":
            from .screens.hardware import HardwareScreen

            return HardwareScreen(self.simulate, self._sampler, self._sample_interval)
        if tab == "train":
            from .screens.train import TrainScreen

            return TrainScreen()
        if tab == "audit":
            from .screens.audit import AuditScreen

            return AuditScreen()
        if tab == "doctor":
            from .screens.doctor import DoctorScreen

            return DoctorScreen(self.simulate, self._doctor)
        if tab == "models":
            from .screens.models import ModelsScreen

            return ModelsScreen()
        if tab == "datasets":
            from .screens.datasets import DatasetsScreen

            return DatasetsScreen(self._kdf)
        if tab == "plan":
            from .screens.plan import PlanScreen

            return PlanScreen(self.simulate)
        raise ValueError(tab)

    async def ensure_built(self, tab: str) -> None:
        if tab == "dashboard" or tab in self._built:
            return
        self._built.add(tab)
        await self.query_one(TabbedContent).get_pane(tab).mount(self.build(tab))

    # -- actions ---------------------------------------------------------------

    async def action_show(self, tab: str) -> None:
        await self.ensure_built(tab)
        self.query_one(TabbedContent).active = tab
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
        # The dashboard's counts change when the user acts elsewhere (a CLI in another terminal): re-read on show.
        if event.pane.id == "dashboard":
            self.call_after_refresh(self.query_one(Dashboard).refresh_data)  # (also sent as the app starts)
        else:  # a tab clicked with the mouse or reached with the arrow keys
            await self.ensure_built(event.pane.id)
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
