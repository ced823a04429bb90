"""The terminal UI, driven with Textual's Pilot against real workspaces made by the fixtures.

Runs with events are written as events.jsonl with the events module (no training): the Train screen only ever
reads that file, so a synthetic one exercises exactly what a real run's would. Snapshots use a fixed workspace, a
simulated machine and fixed samples, so nothing in them depends on the clock or on this machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


from textual.widgets import DataTable, Input, Sparkline, Static, TabbedContent  # noqa: E402

from appliance import events  # noqa: E402
from appliance.trust import audit
from appliance.doctor import check  # noqa: E402
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


async def click(pilot, selector: str) -> None:
    """Click a button as a person does: not again within its press animation, during which Textual ignores
    clicks (0.2 s; a fast machine's test would otherwise click into it and lose the click)."""
    import time

    deadline = time.monotonic() + 60
    while pilot.app.screen.query_one(selector).has_class("-active") and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.click(selector)


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


@pytest.mark.parametrize("summary, expected, tab", [
    (Summary(False, 0, 0, 0, [], [], [], 0), "vault init", "datasets"),
    (Summary(True, 0, 0, 0, [], [], [], 1), "models import", "models"),
    (Summary(True, 1, 0, 0, [], [], [], 1), "data import", "datasets"),
    (Summary(True, 1, 1, 0, [], [], [], 1), "appliance train", "plan"),
    (Summary(True, 1, 1, 1, ["r1"], [], [], 1), "follow r1", "train"),
    (Summary(True, 1, 1, 1, [], ["r1"], [], 1), "appliance export r1", "export"),
    (Summary(True, 1, 1, 1, [], ["r1"], ["r1"], 1), "appliance chat r1", "chat"),
])
def test_next_step_follows_the_pipeline(summary, expected, tab):
    assert expected in next_step(summary)[0] and next_step(summary)[1] == tab


@aio
async def test_go_on_the_dashboard_shows_the_screen_of_the_next_step(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "egress guard active" in text(app, "#pipeline")
        assert app.focused is app.query_one("#go")
        await pilot.press("enter")  # no vault yet: Go opens the Data screen, where one is created
        await settle(pilot)
        assert app.query_one(TabbedContent).active == "datasets"


@aio
async def test_a_screen_asked_for_while_home_summarizes_stays_shown(home, monkeypatch):
    """A key pressed as the app starts: the Home screen's summary arrives while the asked screen is being built
    (on a loaded machine, every time). It must not take the focus, and with it the tab, back to Home."""
    app = ApplianceApp()
    build = app.build

    def build_while_home_summarizes(tab):
        dashboard = app.query_one(Dashboard)
        dashboard.show(dashboard.summary)  # arrives now, while the Plan screen is mounted
        return build(tab)

    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.query_one(TabbedContent).query_one("ContentTabs").focus()  # as Textual's auto-focus leaves it
        await pilot.pause()
        monkeypatch.setattr(app, "build", build_while_home_summarizes)
        await pilot.press("5")
        await settle(pilot)
        assert app.query_one(TabbedContent).active == "plan" and app.focused is app.query_one("#plan-view")


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
        await pilot.press("g")
        await settle(pilot)
        table = app.query_one("#checks", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        labels = {r[2] for r in rows}
        assert {"egress guard", "guard self-test", "HF_HUB_OFFLINE", "vault keyring"} <= labels
        assert {r[0] for r in rows} >= {"environment", "air-gap", "vault and audit", "hardware", "llama.cpp"}
        guard = next(r for r in rows if r[2] == "egress guard")
        assert str(guard[1]) == "ok"
        backend = next(r for r in rows if r[2] == "llama.cpp CPU backend")  # the kernels in use, by name
        assert str(backend[1]) == "ok" and backend[3] in backend[4]
        assert "failed" not in text(app, "#verdict")


@aio
async def test_doctor_declares_and_revokes_cluster_peers(vault_home):
    from appliance import cluster
    from tests.test_tui_screens import error_message, type_into

    app = ApplianceApp(simulate="cpu-only")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("g")
        await settle(pilot)
        await pilot.press("c")
        await type_into(pilot, "#peer-entries", "10.77.0.2:29400 fd00::3")
        await pilot.press("enter")
        await settle(pilot)
        assert [cluster.show(p["address"], p["port"]) for p in cluster.peers()] == ["10.77.0.2:29400", "fd00::3"]
        table = app.query_one("#checks", DataTable)
        row = next(table.get_row_at(i) for i in range(table.row_count) if table.get_row_at(i)[2] == "cluster peers training may reach")
        assert "10.77.0.2:29400" in row[3] and "fd00::3" in row[3]
        await type_into(pilot, "#peer-entries", "fd00::3")
        await click(pilot, "#peer-revoke")
        await settle(pilot)
        assert [p["address"] for p in cluster.peers()] == ["10.77.0.2"]
        await type_into(pilot, "#peer-entries", "printer.local")
        await pilot.press("enter")
        await settle(pilot)
        assert "printer.local" in error_message(app) and [p["address"] for p in cluster.peers()] == ["10.77.0.2"]
    assert [e["event"] for e in audit.entries() if e["event"].startswith("cluster.")] == ["cluster.allow",
                                                                                         "cluster.revoke"]


# -- audit ------------------------------------------------------------------------

@aio
async def test_audit_filters_by_event_and_verifies_then_detects_tampering(vault_home):
    audit.record("dataset.import", {"dataset": "claims"}, {"records": 64})
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("0")
        await settle(pilot)
        table = app.query_one("#entries", DataTable)
        events_shown = [table.get_row_at(i)[3] for i in range(table.row_count)]
        assert events_shown[:2] == ["vault.init", "dataset.import"]

        app.query_one("#filter", Input).focus()
        await pilot.press(*"dataset")
        await settle(pilot)
        assert [table.get_row_at(i)[3] for i in range(table.row_count)] == ["dataset.import"]

        await click(pilot, "#verify")
        await settle(pilot)
        ok, sentence = app.query_one("AuditScreen").verdict
        assert ok and "intact" in sentence

        log = audit.log_path()
        lines = log.read_bytes().splitlines(keepends=True)
        lines[1] = lines[1].replace(b'"records":64', b'"records":65')
        log.write_bytes(b"".join(lines))
        await click(pilot, "#verify")
        await settle(pilot)
        ok, sentence = app.query_one("AuditScreen").verdict
        assert not ok and "2" in sentence
        assert not isinstance(app.screen, ErrorDialog)  # a failed verification is a result, not an error
    assert audit.entries(event="audit.verify")[-1]["details"]["result"] == "failed"


@aio
async def test_audit_verifies_against_a_trusted_copy_of_the_key(vault_home, tmp_path):
    from appliance.trust import signing

    audit.record("dataset.import", {"dataset": "claims"}, {"records": 64})
    pinned = signing.export_public(signing.workspace_public(), tmp_path / "pinned.pub")
    other = signing.export_public(signing.new_private()[1], tmp_path / "other.pub")
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("0")
        await settle(pilot)
        screen = app.query_one("AuditScreen")
        for path, intact in ((pinned, True), (other, False)):
            app.query_one("#pubkey", Input).value = str(path)
            app.query_one("#pubkey", Input).focus()
            await pilot.press("enter")  # Enter in the key field verifies, as `audit verify --pubkey` does
            await settle(pilot)
            ok, sentence = screen.verdict
            assert ok is intact, sentence
        app.query_one("#pubkey", Input).value = str(tmp_path / "missing.pub")
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "cannot read public key" in str(app.screen.query_one("#message", Static).render())


# -- train ------------------------------------------------------------------------

@aio
async def test_train_follows_a_finished_run_from_its_events(home):
    write_run()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await settle(pilot)
        table = app.query_one("#runs", DataTable)
        assert table.get_row_at(0)[:3] == [RUN, "finished", "3/3"]
        table.focus()
        await pilot.press("enter")
        await settle(pilot)
        screen = app.query_one(TrainScreen)
        assert screen.view.train == {1: 3.0, 2: 2.5, 3: 2.0} and screen.view.val == {3: 2.25}
        chart = str(app.query_one("#chart").render())  # the legend holds the latest of each loss
        assert "train 2.0000" in chart and "val 2.2500" in chart
        stats = text(app, "#stats")
        assert "step 3/3" in stats and "1003 tok/s" in stats and "elapsed 0:11" in stats and "finished" in stats
        assert "finished: trained 3 steps" in "\n".join(line.text for line in app.query_one("#log").lines)
        assert app.query_one("#stop").disabled and app.query_one("#resume").disabled


async def poll(pilot, condition, timeout: float = 180.0) -> None:
    """Let the app run until ``condition()`` holds (the screen follows a run's file on its own timer); the limit is
    only a backstop for a hung app: the asserts that follow decide."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await pilot.pause(0.05)


@aio
async def test_train_reattaches_to_a_running_run_follows_it_live_and_stops_it(home):
    # A stand-in for the training worker: alive, with the run id in its command line (what runs.alive checks).
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", RUN])
    try:
        path = write_run(losses=(3.0,), finished=False, pid=proc.pid)
        app = ApplianceApp()
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("6")
            screen = app.query_one(TrainScreen)
            await poll(pilot, lambda: screen.following == RUN and screen.view.train == {1: 3.0})
            assert screen.following == RUN  # nobody selected it: a running run is followed on its own
            assert screen.view.train == {1: 3.0}
            # The run goes on writing; the screen keeps up without being asked.
            events.EventLog(path / "events.jsonl")(events.Event("progress", "train", "", {"step": 2, "max_steps": 3,
                                                                                          "loss": 1.5}))
            await poll(pilot, lambda: screen.view.train == {1: 3.0, 2: 1.5})
            assert screen.view.train == {1: 3.0, 2: 1.5}
            assert not app.query_one("#stop").disabled and app.query_one("#resume").disabled
            await click(pilot, "#stop")
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
        await pilot.press("g")
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
        await pilot.press("g")
        await settle(pilot)
        assert isinstance(app.screen, ErrorDialog)
        message = str(app.screen.query_one("#message", Static).render())
        assert message == "internal error: KeyError: 'section'"
        assert "Traceback" not in app.export_screenshot()


@aio
async def test_keys_help_and_command_palette_switch_screens(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        # alt+key switches from anywhere (the Data screen focuses its passphrase field, where "5" would type)
        for key, tab in zip("2345678901g", ("hardware", "models", "datasets", "plan", "train", "evaluate", "export",
                                            "chat", "audit", "dashboard", "doctor")):
            await pilot.press(f"alt+{key}")
            await pilot.pause()
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
        for key in "1234567890g":  # (alt: the Data screen focuses its passphrase field, where digits type)
            await pilot.press(f"alt+{{key}}")
            await pilot.pause(0.2)
        await pilot.pause(1.0)
        assert app.query_one("TabbedContent").active == "doctor"

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


@pytest.mark.parametrize("key, tab", [("1", "dashboard"), ("2", "hardware"), ("6", "train"), ("0", "audit"),
                                      ("g", "doctor")])
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
        await pilot.press("g")
        await settle(pilot)

    app = ApplianceApp(simulate="cpu-only", sampler=fixed_sample, doctor=broken, sample_interval=3600)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# -- the real command in a real terminal --------------------------------------------------

class Terminal:
    """The real `appliance` command in a tmux pane: keys in, the pane's text out, as a person sees it."""

    def __init__(self, tmp_path: Path, width: int = 100, height: int = 30) -> None:
        import shutil

        exe = Path(sys.executable).parent / "appliance"
        if not exe.is_file():
            pytest.skip("the appliance command is not installed in this environment")
        self.tmux = shutil.which("tmux")
        self.session = f"appliance-tui-{os.getpid()}"
        self.done = tmp_path / "exit-code"
        env = {"APPLIANCE_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "APPLIANCE_PASSPHRASE_FILE": ""}
        script = f"cd {tmp_path} && env {' '.join(f'{k}={v}' for k, v in env.items())} {exe}; echo $? > {self.done}"
        subprocess.run([self.tmux, "-L", self.session, "new-session", "-d", "-s", self.session, "-x", str(width),
                        "-y", str(height), script], check=True)

    def screen(self) -> str:
        return subprocess.run([self.tmux, "-L", self.session, "capture-pane", "-p", "-t", self.session],
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        import time

        for key in keys:
            subprocess.run([self.tmux, "-L", self.session, "send-keys", "-t", self.session, *(["-l"] if literal else []),
                            key], check=True)
            # A terminal reads Escape followed at once by a key as Alt+key: pause after it, as a person would.
            time.sleep(0.6 if key == "Escape" else 0.15)

    def wait_for(self, *texts: str, timeout: float = 30) -> str:
        """The screen once it shows every text (a busy machine: up to `timeout` seconds)."""
        import time

        deadline = time.time() + timeout
        while True:
            screen = self.screen()
            if all(t in screen for t in texts) or time.time() > deadline:
                assert all(t in screen for t in texts), f"expected {texts} on screen:\n{screen}"
                return screen
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([self.tmux, "-L", self.session, "kill-server"], capture_output=True)


@pytest.mark.skipif(not __import__("shutil").which("tmux"), reason="tmux is not installed")
def test_a_person_creates_the_vault_imports_a_dataset_and_finds_the_audit_and_air_gap(tmp_path):
    """`appliance` with no arguments, in a real terminal: what a person new to it would do and see."""
    import time

    rows = [{"messages": [{"role": "user", "content": f"Question number {i}: what is the capital of country {i}?"},
                          {"role": "assistant", "content": f"The capital of country {i} is city {i} by the river."}]}
            for i in range(20)]
    (tmp_path / "claims.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    term = Terminal(tmp_path)
    try:
        # The dashboard: what exists and what to do next; Go takes the person there.
        screen = term.wait_for("Home", "next:", "no vault yet", "Go")
        assert "egress guard active" in screen and "q quit" in screen
        term.keys("Enter")
        term.wait_for("Choose a passphrase")
        term.keys("long enough passphrase", literal=True)
        term.keys("Tab")
        term.keys("long enough passphrase", literal=True)
        term.keys("Enter")
        term.wait_for("no datasets yet", timeout=60)  # the vault exists and is open
        term.keys("i")
        term.wait_for("file (JSONL")
        term.keys(str(tmp_path / "claims.jsonl"), literal=True)
        term.keys("Tab")
        term.keys("claims", literal=True)
        term.keys("Enter")
        screen = term.wait_for("claims", "16", "2", timeout=60)  # 20 records: 16 train, 2 validation, 2 test
        # The security officer: the audit log (key 0) and the air-gap status (key g).
        term.keys("0")
        term.wait_for("vault.init", "dataset.import")
        term.keys("g")
        term.wait_for("egress guard", "installed", "HF_HUB_OFFLINE")
        term.keys("?")
        term.wait_for("keys", "command palette")
        term.keys("Escape")
        term.keys("1")
        term.wait_for("next:", "import a model", "Models screen")  # the next step moved on
        term.keys("q")
        for _ in range(100):
            time.sleep(0.1)
            if term.done.is_file():
                break
        assert term.done.read_text().strip() == "0"
    finally:
        term.close()
