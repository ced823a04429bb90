"""What every screen shares: library calls in worker threads, and their failures as a dialog."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from textual.containers import Vertical
from textual.worker import Worker, WorkerState


class Pane(Vertical):
    """A screen's body. ``call`` runs a library function in a thread and hands its result to ``done`` on the UI
    thread; an exception becomes the app's error dialog (``exit_on_error=False``: the app stays up).

    The screen's own handlers (``on_*``, ``action_*``) get the same treatment: an exception raised in one becomes
    the dialog too. Textual would otherwise end the app on it (a handler's exception is fatal there by design).
    """

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for name, fn in list(vars(cls).items()):
            if name.startswith(("on_", "action_")) and inspect.isfunction(fn) and not hasattr(fn, "_guarded"):
                setattr(cls, name, _guarded(fn))

    def call(self, fn: Callable[[], Any], done: Callable[[Any], None], *, group: str) -> Worker:
        def job():
            result = fn()
            self.app.call_from_thread(done, result)

        return self.run_worker(job, thread=True, exclusive=True, group=group, exit_on_error=False,
                               name=f"{type(self).__name__}.{group}")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.app.show_error(event.worker.error)

    def refresh_data(self) -> None:
        """Reload what the screen shows from the workspace (the `r` key)."""

    def focus_default(self) -> None:
        """Called when the screen is shown: focus what its own keys act on, so they work (and show in the footer)
        at once. The first slice's screens leave the focus where it was."""


def unlocked() -> bool:
    """Whether this process holds the vault's keys (its signing key is installed by init and unlock alike)."""
    from appliance.trust import signing

    return signing.private_raw() is not None


def require_unlocked() -> None:
    """Raise the one sentence a locked vault means in the TUI; never fall back to a passphrase prompt (a worker
    thread has no terminal to ask on)."""
    from appliance.errors import InvalidInput, NotFound
    from appliance.trust import keyring

    if not keyring.exists():
        raise NotFound(f"no vault at {keyring.path()}: the appliance signs every artifact with the key its vault "
                       "keeps; create the vault on the Data screen (key 4).")
    if not unlocked():
        raise InvalidInput("the vault is locked in this session; unlock it on the Data screen (key 4) first.")


def _guarded(fn: Callable) -> Callable:
    """``fn`` with its exceptions shown in the error dialog (same signature: Textual counts its parameters)."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def guarded(self, *args: Any) -> Any:
            try:
                return await fn(self, *args)
            except Exception as error:
                self.app.show_error(error)
    else:
        @functools.wraps(fn)
        def guarded(self, *args: Any) -> Any:
            try:
                return fn(self, *args)
            except Exception as error:
                self.app.show_error(error)
    guarded._guarded = True  # type: ignore[attr-defined]
    return guarded
