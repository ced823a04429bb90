"""The terminal UI, driven with Textual's Pilot against real workspaces made by the fixtures.

Runs with events are written as events.jsonl with the events module (no training): the Train screen only ever
reads that file, so a synthetic one exercises exactly what a real run's would. Snapshots use a fixed workspace, a
simulated machine and fixed samples, so nothing in them depends on the clock or on this machine.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, Sparkline, Static, TabbedContent  # noqa: E402

from appliance import audit, events  # noqa: E402
from appliance.airgap import check  # noqa: E402
from appliance.errors import NotFound  # noqa: E402
from appliance.workspace import folder, write_json  # noqa: E402
from tui.app import ApplianceApp, HelpScreen  # noqa: E402
from tui.errors import ErrorDialog  # noqa: E402
from tui.screens.dashboard import Dashboard, Summary, next_step  # noqa: E402
from tui.screens.hardware import HardwareScreen  # noqa: E402
from tui.screens.train import TrainScreen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = (100, 30)
GiB = 2**30
RUN = "tiny-20261122-090000-abcd"
T0 = 1_795_000_000.0  # a fixed clock for synthetic events


def aio(test):
    """Run an async test with asyncio.run (no pytest plugin needed); fixtures pass through unchanged."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def fixed_sample() -> dict:
    """A sample as hardware.sample() returns it, with round numbers: 24 of 64 GiB RAM, two GPUs."""
    return {"ram_used": 24 * GiB, "ram_available": 40 * GiB, "gpus": [
        {"index": 0, "memory_used": 18 * GiB, "memory_total": 24 * GiB, "utilization": 97, "temperature_c": 71,
         "power_w": 430.0},
        {"index": 1, "memory_used": 2 * GiB, "memory_total": 24 * GiB, "utilization": 0, "temperature_c": 36,
         "power_w": 22.0}]}


def fixed_doctor() -> list:
    return [("air-gap", [check("guard", "egress guard", "ok", "installed"),
                         check("interfaces", "interfaces up besides loopback", "warn", ["eth0"], "eth0: 10.0.0.2")]),
            ("vault and audit", [check("keyring", "vault keyring", "info", "absent")])]


def write_run(run_id: str = RUN, losses=(3.0, 2.5, 2.0), finished: bool = True, pid: int | None = None) -> Path:
    """A run folder as `appliance train` leaves it, with a synthetic events.jsonl (fixed times)."""
    path = folder("runs") / run_id
    path.mkdir(parents=True)
    info = {"id": run_id, "recipe": "tiny", "recipe_sha256": "0" * 64, "base_model": "tiny", "dataset": "/data/x"}
    if pid:
        info["pid"] = pid
    write_json(path / "run.json", info)
    log = events.EventLog(path / "events.jsonl")
    log(events.Event("stage", "train", "starting on cpu with 2 threads", t=T0))
    for i, loss in enumerate(losses, 1):
        log(events.Event("progress", "train", "", {"step": i, "max_steps": len(losses), "loss": loss,
                                                   "tokens_per_s": 1000.0 + i, "rss_bytes": GiB // 2}, t=T0 + i))
    log(events.Event("metric", "train", "", {"eval_loss": 2.25}, t=T0 + 10))
    if finished:
        log(events.Event("finished", "train", "trained 3 steps", t=T0 + 11))
    return path


async def settle(pilot, rounds: int = 3) -> None:
    """Let workers finish and their results reach the widgets."""
    from textual.worker import WorkerState

    for _ in range(rounds):
        for _ in range(400):  # at most 20 s
            if not any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in pilot.app.workers):
                break
            await asyncio.sleep(0.05)
        await pilot.pause()


def text(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


# -- dashboard --------------------------------------------------------------------

@aio
async def test_dashboard_on_an_empty_workspace_says_to_create_the_vault(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.query_one(TabbedContent).active == "dashboard"
        assert "appliance vault init" in text(app, "#next")
        assert app.query_one(Dashboard).summary.vault is False


@aio
async def test_dashboard_counts_the_workspace_and_moves_the_next_step_on(vault_home):
    write_run()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        s = app.query_one(Dashboard).summary
        assert (s.vault, s.models, s.runs, s.finished) == (True, 0, 1, [RUN])
        assert s.audit_entries == len(audit.entries()) > 0  # vault.init at least
        assert "appliance models import" in text(app, "#next")  # a vault, but no model yet


@pytest.mark.parametrize("summary, expected", [
    (Summary(False, 0, 0, 0, [], [], [], 0), "vault init"),
    (Summary(True, 0, 0, 0, [], [], [], 1), "models import"),
    (Summary(True, 1, 0, 0, [], [], [], 1), "data import"),
    (Summary(True, 1, 1, 0, [], [], [], 1), "appliance train"),
    (Summary(True, 1, 1, 1, ["r1"], [], [], 1), "follow r1"),
    (Summary(True, 1, 1, 1, [], ["r1"], [], 1), "appliance merge r1"),
    (Summary(True, 1, 1, 1, [], ["r1"], ["r1"], 1), "appliance chat r1"),
])
def test_next_step_follows_the_pipeline(summary, expected):
    assert expected in next_step(summary)


# -- hardware ---------------------------------------------------------------------

@aio
async def test_hardware_shows_the_simulated_profile_and_samples_live(home):
    app = ApplianceApp(simulate="2x-rtx4090", sample_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        screen = app.query_one(HardwareScreen)
        for _ in range(100):  # real samples from the profile's fake NVML, one every 50 ms
            await pilot.pause(0.05)
            if screen.samples >= 3 and len(screen.gpu) == 2:
                break
        assert screen.samples >= 3
        facts = text(app, "#facts")
        assert "simulated: 2x-rtx4090" in facts and "RTX 4090" in facts
        assert set(screen.gpu) == {0, 1}
        history, label, spark = screen.gpu[0]
        assert "GPU 0:" in str(label.render()) and "of 24.0 GiB in use" in str(label.render())
        assert len(spark.data) >= 2 and len(app.query_one("#ram-spark", Sparkline).data) >= 2


# -- doctor -----------------------------------------------------------------------

@aio
async def test_doctor_runs_the_real_checks_in_a_worker(home):
    app = ApplianceApp(simulate="cpu-only")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        table = app.query_one("#checks", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        labels = {r[2] for r in rows}
        assert {"egress guard", "guard self-test", "HF_HUB_OFFLINE", "vault keyring"} <= labels
        assert {r[0] for r in rows} >= {"environment", "air-gap", "vault and audit", "hardware"}
        guard = next(r for r in rows if r[2] == "egress guard")
        assert str(guard[1]) == "ok"
        assert "failed" not in text(app, "#verdict")


# -- audit ------------------------------------------------------------------------

@aio
async def test_audit_filters_by_event_and_verifies_then_detects_tampering(vault_home):
    audit.record("dataset.import", {"dataset": "claims"}, {"records": 64})
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await settle(pilot)
        table = app.query_one("#entries", DataTable)
        events_shown = [table.get_row_at(i)[3] for i in range(table.row_count)]
        assert events_shown[:2] == ["vault.init", "dataset.import"]

        app.query_one("#filter", Input).focus()
        await pilot.press(*"dataset")
        await settle(pilot)
        assert [table.get_row_at(i)[3] for i in range(table.row_count)] == ["dataset.import"]

        await pilot.click("#verify")
        await settle(pilot)
        ok, sentence = app.query_one("AuditScreen").verdict
        assert ok and "intact" in sentence

        log = audit.log_path()
        lines = log.read_bytes().splitlines(keepends=True)
        lines[1] = lines[1].replace(b'"records":64', b'"records":65')
        log.write_bytes(b"".join(lines))
        await pilot.click("#verify")
        await settle(pilot)
        ok, sentence = app.query_one("AuditScreen").verdict
        assert not ok and "2" in sentence
        assert not isinstance(app.screen, ErrorDialog)  # a failed verification is a result, not an error
    assert audit.entries(event="audit.verify")[-1]["details"]["result"] == "failed"


# -- train ------------------------------------------------------------------------

@aio
async def test_train_follows_a_finished_run_from_its_events(home):
    write_run()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        table = app.query_one("#runs", DataTable)
        assert table.get_row_at(0)[:3] == [RUN, "finished", "3/3"]
        table.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert app.query_one("#loss", Sparkline).data == [3.0, 2.5, 2.0]
        stats = text(app, "#stats")
        assert "step 3/3" in stats and "loss 2.0000" in stats and "val 2.2500" in stats and "1003 tok/s" in stats
        assert "finished: trained 3 steps" in text(app, "#last")
        assert app.query_one("#stop").disabled


@aio
async def test_train_reattaches_to_a_running_run_follows_it_live_and_stops_it(home):
    # A stand-in for the training worker: alive, with the run id in its command line (what runs.alive checks).
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", RUN])
    try:
        path = write_run(losses=(3.0,), finished=False, pid=proc.pid)
        app = ApplianceApp()
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("3")
            screen = app.query_one(TrainScreen)
            for _ in range(100):
                await pilot.pause(0.05)
                if screen.following == RUN and app.query_one("#loss", Sparkline).data == [3.0]:
                    break
            assert screen.following == RUN  # nobody selected it: a running run is followed on its own
            assert app.query_one("#loss", Sparkline).data == [3.0]
            # The run goes on writing; the screen keeps up without being asked.
            events.EventLog(path / "events.jsonl")(events.Event("progress", "train", "", {"step": 2, "max_steps": 3,
                                                                                          "loss": 1.5}))
            for _ in range(100):
                await pilot.pause(0.05)
                if app.query_one("#loss", Sparkline).data == [3.0, 1.5]:
                    break
            assert app.query_one("#loss", Sparkline).data == [3.0, 1.5]
            assert not app.query_one("#stop").disabled
            await pilot.click("#stop")
            assert proc.wait(timeout=10) == -signal.SIGTERM
            await settle(pilot)
        assert audit.entries(event="train.stop")[-1]["subjects"] == {"run": RUN}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- shell: errors, help, palette, NO_COLOR --------------------------------------------

@aio
async def test_an_appliance_error_in_a_worker_is_a_dialog_with_its_sentence(home):
    def broken():
        raise NotFound("no model with id 'x'; import one with `appliance models import PATH`.")

    app = ApplianceApp(doctor=broken)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert str(app.screen.query_one("#message", Static).render()) == (
            "no model with id 'x'; import one with `appliance models import PATH`.")
        await pilot.press("escape")
        assert not isinstance(app.screen, ErrorDialog)
        await pilot.press("1")  # still alive and responsive
        assert app.query_one(TabbedContent).active == "dashboard"


@aio
async def test_a_bug_in_a_worker_is_an_internal_error_dialog_without_traceback(home):
    def broken():
        raise KeyError("section")

    app = ApplianceApp(doctor=broken)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        assert isinstance(app.screen, ErrorDialog)
        message = str(app.screen.query_one("#message", Static).render())
        assert message == "internal error: KeyError: 'section'"
        assert "Traceback" not in app.export_screenshot()


@aio
async def test_keys_help_and_command_palette_switch_screens(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        for key, tab in zip("23451", ("hardware", "train", "audit", "doctor", "dashboard")):
            await pilot.press(key)
            assert app.query_one(TabbedContent).active == tab
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Show Audit")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one(TabbedContent).active == "audit"
        await settle(pilot)


def _colours(svg: str) -> set[str]:
    """The text and background colours of a screenshot, less rich's SVG default foreground (not the app's)."""
    import re

    from rich.terminal_theme import SVG_EXPORT_THEME

    return set(re.findall(r"fill: #([0-9a-f]{6})", svg)) - {SVG_EXPORT_THEME.foreground_color.hex[1:]}


@aio
async def test_no_color_is_honoured(home, monkeypatch):
    # Textual reads NO_COLOR itself (App.__init__) and renders through a monochrome filter.
    monkeypatch.setenv("NO_COLOR", "1")
    app = ApplianceApp()
    assert app.no_color
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        svg = app.export_screenshot()
    colours = _colours(svg)
    assert colours and all(c[0:2] == c[2:4] == c[4:6] for c in colours), colours  # greys only


@aio
async def test_without_no_color_there_is_colour(home, monkeypatch):
    # The other side of the test above, so that it can fail: the same screen has colours when NO_COLOR is unset.
    monkeypatch.delenv("NO_COLOR", raising=False)
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        svg = app.export_screenshot()
    colours = _colours(svg)
    assert any(not (c[0:2] == c[2:4] == c[4:6]) for c in colours)


# -- start-up stays light -------------------------------------------------------------

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp", "trl", "datasets")


def test_tui_starts_without_importing_heavy_libraries(tmp_path):
    probe = f"""
import asyncio, sys
import tui.app
after_import = [m for m in {HEAVY!r} if m in sys.modules]

async def main():
    app = tui.app.ApplianceApp(simulate="1x-rtx4090")
    async with app.run_test(size=(100, 30)) as pilot:
        for key in "12345678":
            await pilot.press(key)
            await pilot.pause(0.2)
        await pilot.pause(1.0)

asyncio.run(main())
print(",".join(after_import) + "|" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=env, timeout=120).stdout.strip().splitlines()[-1]
    assert out == "|", out


# -- snapshots (pytest-textual-snapshot; update with --snapshot-update) ---------------------

def _snapshot_workspace(monkeypatch):
    """Audit entries with a fixed clock and user, and one finished run: the same workspace every time."""
    monkeypatch.setattr(audit, "_iso", lambda t: "2026-11-22T09:00:00.000000Z")
    monkeypatch.setattr(audit, "_user", lambda: "analyst")
    audit.record("dataset.import", {"dataset": "claims"}, {"records": 64})
    audit.record("train.start", {"run": RUN, "dataset": "claims", "base_model": "tiny"}, {"recipe": "tiny"})
    write_run()


def _snapshot_app() -> ApplianceApp:
    return ApplianceApp(simulate="2x-rtx4090", sampler=fixed_sample, doctor=fixed_doctor, sample_interval=3600)


@pytest.mark.parametrize("key, tab", [("1", "dashboard"), ("2", "hardware"), ("3", "train"), ("4", "audit"),
                                      ("5", "doctor")])
def test_snapshot(key, tab, home, monkeypatch, snap_compare):
    _snapshot_workspace(monkeypatch)

    async def run_before(pilot):
        await pilot.press(key)
        await settle(pilot)
        if tab == "train":
            pilot.app.query_one("#runs", DataTable).focus()
            await pilot.press("enter")
            await settle(pilot)
        await asyncio.sleep(0)

    assert snap_compare(_snapshot_app(), terminal_size=SIZE, run_before=run_before)


def test_snapshot_error_dialog(home, snap_compare):
    def broken():
        raise NotFound("no run with id 'r1' in the workspace; `appliance runs list` shows them.")

    async def run_before(pilot):
        await pilot.press("5")
        await settle(pilot)

    app = ApplianceApp(simulate="cpu-only", sampler=fixed_sample, doctor=broken, sample_interval=3600)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# -- the real command in a real terminal --------------------------------------------------

@pytest.mark.skipif(not __import__("shutil").which("tmux"), reason="tmux is not installed")
def test_appliance_with_no_arguments_opens_the_tui_in_a_terminal_and_q_quits(tmp_path):
    import shutil
    import time

    exe = Path(sys.executable).parent / "appliance"
    if not exe.is_file():
        pytest.skip("the appliance command is not installed in this environment")
    session = f"appliance-tui-{os.getpid()}"
    done = tmp_path / "exit-code"
    env = {"APPLIANCE_HOME": str(tmp_path / "home"), "TERM": "xterm-256color"}
    script = f"env {' '.join(f'{k}={v}' for k, v in env.items())} {exe}; echo $? > {done}"
    tmux = shutil.which("tmux")
    subprocess.run([tmux, "-L", session, "new-session", "-d", "-s", session, "-x", "100", "-y", "30", script],
                   check=True)
    try:
        screen = ""
        for _ in range(150):  # up to 15 s on a busy machine
            time.sleep(0.1)
            screen = subprocess.run([tmux, "-L", session, "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            if "appliance vault init" in screen:
                break
        assert "Dashboard" in screen and "appliance vault init" in screen, screen
        subprocess.run([tmux, "-L", session, "send-keys", "-t", session, "q"], check=True)
        for _ in range(100):
            time.sleep(0.1)
            if done.is_file():
                break
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run([tmux, "-L", session, "kill-server"], capture_output=True)
