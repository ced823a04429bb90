"""What every screen shares: library calls in worker threads, and their failures as a dialog."""

from __future__ import annotations

from typing import Any, Callable

from textual.containers import Vertical
from textual.worker import Worker, WorkerState


class Pane(Vertical):
    """A screen's body. ``call`` runs a library function in a thread and hands its result to ``done`` on the UI
    thread; an exception becomes the app's error dialog (``exit_on_error=False``: the app stays up)."""

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
