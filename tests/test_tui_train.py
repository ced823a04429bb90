"""The TUI's Train screen against a real training run (started from the CLI, followed, stopped, resumed from the
TUI, finished), its event folding on its own; Audit's time filter and report; Data's verify, rekey and plaintext
export. Driven with Pilot against real workspaces."""

from __future__ import annotations

import json
import time

import pytest

import textual_plotext  # noqa: E402,F401  (the Train screen's chart; pinned: a broken install fails here)

from textual.widgets import DataTable, Input, Markdown, ProgressBar, RichLog, Static  # noqa: E402

from appliance import events  # noqa: E402
from appliance.trust import keys
from appliance.trust import audit
from appliance.trust import keyring, store  # noqa: E402
from tests.conftest import PASSPHRASE, cli_json, write_recipe  # noqa: E402
from tests.test_tui import GiB, RUN, SIZE, T0, aio, click, text, write_run  # noqa: E402
from tests.test_tui_screens import error_message, rendered, settle, type_into  # noqa: E402
from tui.app import ApplianceApp  # noqa: E402
from tui.screens.audit import AuditScreen, ReportDialog  # noqa: E402
from tui.screens.datasets import ConfirmDialog, DatasetsScreen  # noqa: E402
from tui.screens.train import RunView, TrainScreen  # noqa: E402

SMALL = (80, 24)  # the smallest terminal the TUI is laid out for


async def wait_for(pilot, predicate, what: str, timeout: float = 180.0) -> None:
    """Poll ``predicate`` while the app runs (a followed run keeps a worker busy: `settle` would wait it out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def put(pilot, selector: str, value: str) -> None:
    """A value put into a field of the screen on top, focused, as a paste would (typing a path or a passphrase key
    by key takes seconds; `type_into` types the first of each)."""
    field = pilot.app.screen.query_one(selector, Input)
    field.focus()
    field.value = value
    await pilot.pause()


async def open_screen(pilot, key: str) -> None:
    """Press a screen's key once Home has shown its first summary (Home focuses its Go button then; a key pressed
    before that could lose the race and leave Home in front)."""
    await settle(pilot)
    await pilot.press(key)


def log_text(app) -> str:
    return "\n".join(line.text for line in app.query_one("#log", RichLog).lines)


def ev(type_: str, t: float, message: str = "", **data) -> events.Event:
    return events.Event(type_, "train", message, data, t=T0 + t)


# -- the run's figures, folded from its events ------------------------------------------------------------------

def test_run_view_shows_dpo_rewards_the_best_evaluation_and_overfitting():
    view = RunView()
    view.add(ev("progress", 1, step=1, max_steps=30, loss=0.69, reward_margin=0.123, reward_accuracy=0.625))
    assert "reward margin 0.123 · reward accuracy 62%" in view.stats()
    assert view.add(ev("metric", 2, step=10, eval_loss=0.61, best=True, eval_reward_margin=0.25,
                       eval_reward_accuracy=0.75)) == (
        "metric", "step 10: validation loss 0.6100, reward margin 0.250, reward accuracy 75% (best so far)")
    warned = view.add(ev("warning", 3, "overfitting: validation loss rose for 3 evaluations in a row",
                         overfitting={"best_step": 10}))
    assert warned == ("warning", "overfitting: validation loss rose for 3 evaluations in a row")


def test_plan_details_show_the_time_estimate_and_the_guides_checks():
    from tui.screens.plan import details, summary

    plan = {"verdict": "fits", "hardware": "cpu", "limit_fraction": 0.9, "choices": [], "adjustments": [],
            "model": {"name": "m", "parameters": 1e8, "layers": 2},
            "knobs": {"quant": "nf4", "lora_r": 16, "micro_batch": 4, "grad_accum": 1, "seq_len": 128,
                      "grad_ckpt": False, "optimizer": "adamw_torch", "dpo": True},
            "strategy": {"mode": "single", "why": "one device"},
            "duration": {"seconds": 600, "basis": "30 steps of ~1,000 tokens at ~50 tokens/s on 2 CPU cores"},
            "checks": [{"key": "training.warmup_steps", "message": "training.warmup_steps is 0: set it"}]}
    assert "time: about 10 min" in summary(plan) and "DPO on LoRA r=16" in summary(plan)
    text = details(plan)
    assert "30 steps of ~1,000 tokens" in text and "warning:[/] training.warmup_steps is 0: set it" in text

def test_run_view_folds_loss_eta_elapsed_over_attempts_and_logs_what_matters():
    view = RunView()
    assert view.add(ev("stage", 0, "starting on cpu with 2 threads", resume=False)) == (
        "stage", "starting on cpu with 2 threads")
    view.add(ev("progress", 4, step=0, max_steps=10))
    for step in (1, 2, 3, 4):  # one step every 2 s
        view.add(ev("progress", 4 + 2 * step, step=step, max_steps=10, loss=3.0 - step / 10, learning_rate=1e-3,
                    tokens_per_s=900.0, rss_bytes=2 * GiB, ram_total_bytes=64 * GiB))
    assert view.add(ev("metric", 12.5, step=4, eval_loss=2.5)) == ("metric", "step 4: validation loss 2.5000")
    assert view.add(ev("metric", 13, step=4, checkpoint="checkpoint-4")) == ("checkpoint", "checkpoint-4 saved")
    assert view.eta() == pytest.approx(6 * 2.0)  # 6 steps left at 2 s a step
    assert view.stats() == "step 4/10 · lr 1.00e-03 · 900 tok/s · elapsed 0:13 · ETA 0:12"
    assert "ETA" not in view.stats(live=False)  # a run that is not running has no ETA
    assert view.gauges() == [("ram", "RAM 2.00/64.0 GiB (worker)", 2.0 * GiB, 64.0 * GiB)]
    view.add(ev("warning", 14, "stopped on request; `appliance runs resume` continues from the last checkpoint"))

    # A resume an hour later: its elapsed time adds to the first attempt's 14 s; step 4 is trained again.
    view.add(ev("stage", 3600, "resuming on cpu with 2 threads", resume=True))
    view.add(ev("progress", 3604, step=4, max_steps=10))
    view.add(ev("progress", 3605, step=5, max_steps=10, loss=2.4, gpu_memory_used_bytes=18 * GiB,
                gpu_memory_total_bytes=24 * GiB, rss_bytes=GiB, ram_total_bytes=64 * GiB))
    assert view.elapsed() == pytest.approx(14 + 5)
    assert view.eta() == pytest.approx(5 * 1.0)  # the pace of this attempt only
    kind, line = view.add(ev("warning", 3606, "out of memory at step 6 with micro-batch 4; continuing",
                             oom_recovery={"at_step": 6}))
    assert kind == "oom" and line.startswith("out-of-memory recovery: out of memory at step 6")
    view.add(ev("warning", 3607, "memory: 91% of GPU 0 in use", memory={}, device="GPU 0"))
    assert view.memory_warning == "GPU 0"
    assert [g[0] for g in view.gauges()] == ["ram", "gpu0"] and view.gauges()[1][1] == "GPU 18.0/24.0 GiB"
    view.add(ev("progress", 3610, step=10, max_steps=10, loss=2.0))
    view.add(ev("metric", 3611, step=10, eval_loss=2.1))
    assert view.add(ev("finished", 3612, "10 steps, final loss 2.0000")) == ("finished", "10 steps, final loss 2.0000")
    assert sorted(view.train) == [1, 2, 3, 4, 5, 10] and view.val == {4: 2.5, 10: 2.1}
    assert view.latest("train") == 2.0 and view.latest("val") == 2.1
    assert view.eta() is None and view.stats().endswith("finished")


@aio
async def test_train_screen_redraws_at_most_a_few_times_a_second(home):
    path = write_run(losses=[3.0 - i / 1000 for i in range(600)])  # 600 events read at once
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "6")
        await settle(pilot)
        app.query_one("#runs", DataTable).focus()
        await pilot.press("enter")
        await settle(pilot)
        screen = app.query_one(TrainScreen)
        assert len(screen.view.train) == 600 and screen.view.ended == "finished"
        assert screen.drawn <= 12, screen.drawn  # not one redraw per event
        assert "train 2.4010" in str(app.query_one("#chart").render())
    assert path.is_dir()


@aio
async def test_train_screen_is_legible_at_80x24_and_grows_with_the_terminal(home):
    path = write_run(losses=[3.0 - i / 20 for i in range(30)], finished=False)
    events.EventLog(path / "events.jsonl")(ev("progress", 40, step=31, max_steps=60, loss=1.4, rss_bytes=3 * GiB,
                                              ram_total_bytes=64 * GiB, gpu_memory_used_bytes=18 * GiB,
                                              gpu_memory_total_bytes=24 * GiB))
    heights = {}
    for size in (SMALL, (160, 50)):
        app = ApplianceApp()
        async with app.run_test(size=size) as pilot:
            await open_screen(pilot, "6")
            await settle(pilot)
            app.query_one("#runs", DataTable).focus()
            await pilot.press("enter")
            await settle(pilot)
            await pilot.pause(0.3)
            screen = app.query_one(TrainScreen)
            chart, log, table = (app.query_one(s) for s in ("#chart", "#log", "#runs"))
            bottom = app.query_one("Footer").region.y
            assert chart.size.height >= 8, chart.size
            assert table.region.height >= 2 and log.region.height >= 3 and log.region.bottom <= bottom
            assert len(app.query(".gauge")) == 2  # RAM and the GPU, one row each
            for gauge in app.query(".gauge"):
                assert gauge.region.bottom <= bottom
            assert len(text(app, "#stats").splitlines()) == 1 and "step 31/60" in text(app, "#stats")
            assert not screen.query_one("#resume").disabled  # its worker is gone: interrupted, resumable
            heights[size] = chart.size.height
    assert heights[(160, 50)] > heights[SMALL] + 10


@aio
async def test_train_screen_honours_no_color(home, monkeypatch):
    from tests.test_tui import _colours

    monkeypatch.setenv("NO_COLOR", "1")
    write_run()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "6")
        await settle(pilot)
        app.query_one("#runs", DataTable).focus()
        await pilot.press("enter")
        await settle(pilot)
        assert app.query_one(TrainScreen).view.train
        svg = app.export_screenshot()
    colours = _colours(svg)
    assert colours and all(c[0:2] == c[2:4] == c[4:6] for c in colours), colours  # the chart's lines too: greys


# -- a real run: reattach, live chart, stop, resume from the TUI, finish -------------------------------------------

@aio
async def test_train_follows_a_cli_run_live_stops_it_and_resumes_it_to_the_end(tiny_home, tmp_path, demo_dataset):
    home = tiny_home
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=14, save_steps=100, eval_steps=7)
    # The worker holds at the end of step 5 until it is stopped: with step 4 seen before stopping, the stop lands at
    # step 5 whatever the machine's speed.
    run_id = cli_json("train", str(recipe), "--detach", home=home, env={"APPLIANCE_FAULT": "wait_for_stop_at_step:5"})["run"]
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "6")
        screen = app.query_one(TrainScreen)
        # Reattach: nobody selected the run; it is followed because it is running.
        await wait_for(pilot, lambda: screen.following == run_id, "the screen to follow the run")
        await wait_for(pilot, lambda: len(screen.view.train) >= 2, "two logged steps")
        seen, drawn = len(screen.view.train), screen.drawn
        await wait_for(pilot, lambda: len(screen.view.train) > seen and screen.drawn > drawn, "the chart to grow")
        await pilot.pause(0.3)
        stats = text(app, "#stats")
        assert "lr " in stats and "tok/s" in stats and "ETA" in stats and "elapsed" in stats, stats
        # A step may land between the chart's last draw and this look: the chart catches up on its next draw.
        await wait_for(pilot, lambda: f"train {screen.view.latest('train'):.4f}" in str(app.query_one("#chart").render()),
                       "the chart's legend to show the latest loss")
        bar = app.query_one(".gauge ProgressBar", ProgressBar)
        assert "RAM" in str(app.query_one(".gauge Label").render()) and 0 < bar.progress < bar.total
        assert not app.query_one("#stop").disabled and app.query_one("#resume").disabled
        assert "starting on cpu" in log_text(app)

        # Stop: the worker saves a checkpoint and the run becomes resumable. Step 4 logged means step 4's stop check
        # is past: the worker is in step 5 or held at its end, so the stop lands at step 5.
        await wait_for(pilot, lambda: len(screen.view.train) >= 4, "four logged steps")
        app.query_one("#runs", DataTable).focus()
        await pilot.press("s")
        # (The run's state flips when its process ends; its last events may reach the screen a poll later.)
        await wait_for(pilot, lambda: screen.state(run_id) == "interrupted" and "stopped on request" in log_text(app),
                       "the run to stop")
        stopped_at = screen.view.step
        assert stopped_at == 5
        assert app.query_one("#stop").disabled and not app.query_one("#resume").disabled

        # Resume from the TUI: a detached worker, followed to the end; the validation loss is on the chart.
        await pilot.press("u")
        await wait_for(pilot, lambda: screen.view.ended == "finished" and screen.state(run_id) == "finished",
                       "the resumed run to finish")
        await pilot.pause(0.3)
        assert sorted(screen.view.train) == list(range(1, 15))
        assert sorted(screen.view.val) == [7, 14]
        chart = str(app.query_one("#chart").render())
        assert f"val {screen.view.val[14]:.4f}" in chart
        assert "resuming on cpu" in log_text(app) and "finished: 14 steps" in log_text(app)
        assert app.query_one("#stop").disabled and app.query_one("#resume").disabled
        assert "finished" in text(app, "#stats")
        table = app.query_one("#runs", DataTable)
        assert table.get_row(run_id)[1:3] == ["finished", "14/14"]
    status = json.loads((home / "runs" / run_id / "summary.json").read_text())
    assert status["steps"] == 14 and status["resumed_from"] == f"checkpoint-{stopped_at}"
    assert audit.entries(event="train.stop")[-1]["subjects"]["run"] == run_id
    assert audit.entries(event="train.resume")[-1]["subjects"]["run"] == run_id


@aio
async def test_a_run_resumed_after_a_failure_is_followed_past_the_old_failure(home):
    import subprocess
    import sys

    # A stand-in for the resumed worker: alive, with the run id in its command line (what runs.alive checks).
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", RUN])
    try:
        path = write_run(losses=(3.0, 2.5), finished=False, pid=proc.pid)
        log = events.EventLog(path / "events.jsonl")
        log(ev("failed", 11, "RuntimeError: boom"))
        log(ev("stage", 100, "resuming on cpu with 2 threads", resume=True))
        log(ev("progress", 104, step=2, max_steps=3, loss=2.4))
        app = ApplianceApp()
        async with app.run_test(size=SIZE) as pilot:
            await open_screen(pilot, "6")
            screen = app.query_one(TrainScreen)
            await wait_for(pilot, lambda: screen.view.train == {1: 3.0, 2: 2.4}, "the resumed attempt")
            assert screen.following == RUN and screen.state(RUN) == "running"
            assert "failed: RuntimeError: boom" in log_text(app)  # the earlier attempt's end, in the log only
            assert not app.query_one("#stop").disabled and app.query_one("#resume").disabled
            log(ev("progress", 105, step=3, max_steps=3, loss=2.0))
            log(ev("finished", 106, "trained 3 steps"))
            await wait_for(pilot, lambda: screen.view.ended == "finished" and screen.state(RUN) == "finished",
                           "the end")
            assert screen.view.elapsed() == pytest.approx(11 + 6)  # two attempts: 0..11 s and 100..106 s
    finally:
        proc.kill()
        proc.wait()


@aio
async def test_resume_with_a_locked_vault_says_where_to_unlock(home):
    from appliance.trust import signing

    keyring.init(PASSPHRASE, "pbkdf2-sha256")
    signing.use(None)
    keys.use_vault(None)
    write_run(finished=False)  # no worker: interrupted
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "6")
        await settle(pilot)
        app.query_one("#runs", DataTable).focus()
        await pilot.press("enter")
        await settle(pilot)
        assert app.query_one(TrainScreen).state(RUN) == "interrupted"
        await pilot.press("u")
        await settle(pilot)
        assert "unlock it on the Data screen (key 4)" in error_message(app)
        await pilot.press("escape")
        assert not app.query_one("#resume").disabled  # the button is back for when the vault is open
    assert not audit.entries(event="train.resume")


# -- audit: the time filter and the report --------------------------------------------------------------------

@aio
async def test_audit_filters_by_time_and_writes_the_report(vault_home, tmp_path):
    audit.record("dataset.import", {"dataset": "claims"}, {"records": 64})
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "0")
        await settle(pilot)
        screen = app.query_one(AuditScreen)
        table = app.query_one("#entries", DataTable)
        everything = table.row_count
        assert everything >= 2

        await type_into(pilot, "#since", "2h")
        await settle(pilot)
        assert table.row_count == everything
        app.query_one("#since", Input).value = "2999-01-01"
        await settle(pilot)
        assert table.row_count == 0
        await type_into(pilot, "#filter", "dataset")
        app.query_one("#since", Input).value = "7d"
        await settle(pilot)
        assert [table.get_row_at(i)[3] for i in range(table.row_count)] == ["dataset.import"]

        # A time that does not parse marks the field while typed, and is the dialog, naming the field, on Enter.
        await type_into(pilot, "#since", "yesterday")
        await settle(pilot)
        assert app.query_one("#since").has_class("bad") and table.row_count == 1
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith("since: cannot read the time 'yesterday'")
        await pilot.press("escape")
        app.query_one("#since", Input).value = "1d"
        await settle(pilot)
        assert not app.query_one("#since").has_class("bad")

        # The report: shown as Markdown, saved as HTML or Markdown to a new file, never over an existing one.
        table.focus()
        await pilot.press("p")
        await settle(pilot)
        dialog = app.screen
        assert isinstance(dialog, ReportDialog)
        assert dialog.text.startswith("# Appliance audit report: 1d to now")
        assert "dataset.import" in dialog.text
        assert dialog.query_one("#r-markdown", Markdown).source == dialog.text
        html = tmp_path / "report.html"
        await put(pilot, "#r-path", str(html))
        await pilot.press("enter")
        await settle(pilot)
        assert html.read_text().startswith("<!doctype html>") and dialog.saved == html
        md = tmp_path / "report.md"
        await put(pilot, "#r-path", str(md))
        await click(pilot, "#r-save")
        await settle(pilot)
        assert md.read_text().startswith("# Appliance audit report")
        await put(pilot, "#r-path", str(md))
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app) == f"{md} already exists; name a new file for the report."
        await pilot.press("escape")
        assert isinstance(app.screen, ReportDialog)
        await pilot.press("escape")
        assert not isinstance(app.screen, ReportDialog)
        assert screen.entries
    assert sorted(p.name for p in tmp_path.glob("*report*")) == ["report.html", "report.md"]  # no temporary file


# -- data: verify, rekey, plaintext export ----------------------------------------------------------------------

def _demo_vault() -> None:
    from appliance.demo_data import splits

    store.write(keys.vault(), "demo", splits(train=20, validation=4), hardware={})


@aio
async def test_data_x_imports_the_demo_dataset_the_demo_recipe_names(vault_home):
    """With Models' `e`, the embedded model's pipeline needs no file: `x` generates and encrypts `demo-records`."""
    from appliance import recipes
    from appliance.demo import DATASET_ID, PREFERENCES_ID, recipe_path

    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "4")
        await settle(pilot)
        assert "x for the demo dataset" in rendered(app, "#ds-output")
        screen = app.query_one(DatasetsScreen)
        await pilot.press("x")
        await wait_for(pilot, lambda: sorted(r["id"] for r in screen.rows) == sorted([DATASET_ID, PREFERENCES_ID]),
                       "the demo datasets")
        row = next(r for r in screen.rows if r["id"] == DATASET_ID)
        assert (row["train"], row["validation"], row["test"]) == (400, 48, 48)
        assert f"{DATASET_ID}: 400 train + 48 validation + 48 test records" in rendered(app, "#ds-output")
        assert f"{PREFERENCES_ID}: 240 train + 48 validation + 48 test preference pairs" in rendered(app, "#ds-output")
        await pilot.press("x")  # once only: a second press finds it there
        await settle(pilot)
    assert recipes.load(recipe_path()).dataset == DATASET_ID
    assert recipes.load(recipe_path("demo-dpo.yaml")).dataset == PREFERENCES_ID
    assert [e["details"]["source"] for e in audit.entries(event="dataset.import")] == ["appliance demo generator"] * 2
    assert store.is_encrypted(vault_home / "datasets" / DATASET_ID)


@aio
async def test_data_verify_then_detects_a_damaged_file(vault_home):
    _demo_vault()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "4")
        await settle(pilot)
        screen = app.query_one(DatasetsScreen)
        await pilot.press("v")
        await settle(pilot)
        assert [r["ok"] for r in screen.verified] == [True]
        assert "1 dataset checked, every file authentic" in rendered(app, "#ds-output")

        damaged = next((vault_home / "datasets" / "demo").glob("train.*"))
        blob = bytearray(damaged.read_bytes())
        blob[len(blob) // 2] ^= 1
        damaged.write_bytes(bytes(blob))
        await pilot.press("v")
        await settle(pilot)
        assert [r["ok"] for r in screen.verified] == [False]
        shown = rendered(app, "#ds-output")
        assert "BAD demo" in shown and "1 of 1 datasets are damaged" in shown and damaged.name in shown


@aio
async def test_data_rekey_then_only_the_new_passphrase_unlocks(vault_home):
    _demo_vault()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "4")
        await settle(pilot)
        screen = app.query_one(DatasetsScreen)

        # A passphrase typed and left: closing the form forgets it.
        await pilot.press("k")
        await type_into(pilot, "#rk-old", PASSPHRASE)
        app.query_one("#dataset-table", DataTable).focus()
        await pilot.press("k")
        assert app.query_one("#rk-old", Input).value == "" and not app.query_one("#ds-rekey").has_class("shown")

        # Two different new passphrases: refused, and every field is emptied.
        await pilot.press("k")
        await put(pilot, "#rk-old", PASSPHRASE)
        await put(pilot, "#rk-new", "battery staple")
        await put(pilot, "#rk-new2", "battery stapl")
        await pilot.press("enter")
        await settle(pilot)
        assert "differ" in error_message(app)
        await pilot.press("escape")
        assert all(app.query_one(f"#{i}", Input).value == "" for i in ("rk-old", "rk-new", "rk-new2"))

        # A wrong current passphrase: the keyring's sentence.
        await put(pilot, "#rk-old", "wrong horse")
        await put(pilot, "#rk-new", "battery staple")
        await put(pilot, "#rk-new2", "battery staple")
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith("the passphrase does not open the vault")
        await pilot.press("escape")

        await put(pilot, "#rk-old", PASSPHRASE)
        await put(pilot, "#rk-new", "battery staple")
        await put(pilot, "#rk-new2", "battery staple")
        assert PASSPHRASE not in app.export_screenshot() and "battery staple" not in app.export_screenshot()
        app.query_one("#ds-rekey-kdf").value = "argon2id"
        await pilot.press("enter")
        await settle(pilot)
        assert "passphrase changed (argon2id); 1 keys rewrapped" in rendered(app, "#ds-output")
        assert keyring.load()["kdf"]["name"] == "argon2id"

        # This session's vault is the rewrapped one: an import now writes a keyring the new passphrase opens.
        from appliance.demo_data import splits

        store.write(keys.vault(), "more", splits(train=4, validation=2, seed=1), hardware={})

        # Lock; the old passphrase no longer opens it, the new one does.
        app.query_one("#dataset-table", DataTable).focus()
        await pilot.press("l")
        await settle(pilot)
        assert screen.state == "locked"
        await put(pilot, "#pass", PASSPHRASE)
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith("the passphrase does not open the vault")
        await pilot.press("escape")
        await put(pilot, "#pass", "battery staple")
        await pilot.press("enter")
        await settle(pilot)
        assert screen.state == "open"
    assert sorted(keyring.unlock("battery staple").data["keys"]) == ["demo", "more"]
    with pytest.raises(keyring.WrongPassphrase):
        keyring.unlock(PASSPHRASE)
    assert audit.entries(event="vault.rekey")[-1]["details"]["kdf"] == "argon2id"
    log = audit.log_path().read_text()
    assert PASSPHRASE not in log and "battery staple" not in log


@aio
async def test_data_export_writes_plaintext_only_after_confirmation(vault_home, tmp_path):
    _demo_vault()
    out = tmp_path / "demo.jsonl"
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "4")
        await settle(pilot)
        screen = app.query_one(DatasetsScreen)
        await pilot.press("e")
        await put(pilot, "#ds-export-path", str(out))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        question = str(app.screen.query_one("#question", Static).render())
        assert "all splits of dataset demo in PLAINTEXT" in question and str(out) in question
        await pilot.press("escape")  # cancel: nothing written
        await settle(pilot)
        assert not out.exists() and not audit.entries(event="dataset.export")

        app.query_one("#ds-export-split").value = "validation"
        app.query_one("#ds-export-path", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        await click(pilot, "#yes")
        await settle(pilot)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 4 and all("messages" in r for r in rows)
        assert screen.exported == ("demo", 4, out)
        assert f"wrote 4 records of demo in plaintext to {out}" in rendered(app, "#ds-output")

        # An existing file: said before anything is asked or written.
        await pilot.press("e")
        await put(pilot, "#ds-export-path", str(out))
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app) == f"{out} already exists; name a new file for the plaintext export."
    entry = audit.entries(event="dataset.export")[-1]
    assert entry["subjects"] == {"dataset": "demo"} and entry["details"]["splits"] == ["validation"]
    assert entry["details"]["records"] == 4



@aio
async def test_data_packages_a_dataset_and_imports_a_package(vault_home, tmp_path):
    _demo_vault()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "4")
        await settle(pilot)
        screen = app.query_one(DatasetsScreen)
        await pilot.press("p")
        await put(pilot, "#ds-pkg-out", str(tmp_path / "pkg"))
        await put(pilot, "#ds-pkg-pass", "password1")  # a weak one is refused, with what to do instead
        await put(pilot, "#ds-pkg-pass2", "password1")
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith("that package passphrase is too weak")
        assert not (tmp_path / "pkg").exists()
        await pilot.press("escape")
        await put(pilot, "#ds-pkg-pass", "package secret 1")
        await put(pilot, "#ds-pkg-pass2", "package secret 1")
        assert "package secret 1" not in app.export_screenshot()
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(screen, "packaged", None), "the package")
        assert (tmp_path / "pkg" / "package.json").is_file() and "ciphertext only" in rendered(app, "#ds-output")
        assert all(app.query_one(f"#{i}", Input).value == "" for i in ("ds-pkg-pass", "ds-pkg-pass2"))

        # As the other machine would: the dataset is not here (shredded), the package brings it back.
        store.remove(keys.vault(), "demo")
        await pilot.press("i")
        await put(pilot, "#ds-path", str(tmp_path / "pkg"))
        await put(pilot, "#ds-pkg-open", "package secret 1")
        await pilot.press("enter")  # the signer's fingerprint is shown first; declining opens nothing
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the signer's confirmation")
        assert screen.packaged["signer"] in str(app.screen.question)
        await pilot.press("n")
        await settle(pilot)
        assert "signer was not confirmed" in rendered(app, "#ds-output") and not store.dataset_dir("demo").exists()
        await put(pilot, "#ds-path", str(tmp_path / "pkg"))
        await put(pilot, "#ds-pkg-open", "not the one")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the signer's confirmation")
        await pilot.press("y")
        await settle(pilot)
        assert error_message(app).startswith("the package passphrase does not open")
        await pilot.press("escape")
        await put(pilot, "#ds-pkg-open", "package secret 1")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the signer's confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: getattr(screen, "opened_package", None), "the package's import")
        assert screen.opened_package["signer"] == screen.packaged["signer"]
        await wait_for(pilot, lambda: [r["id"] for r in screen.rows] == ["demo"], "the dataset listed")
        assert "imported package" in rendered(app, "#ds-output")
    assert [e["details"].get("source") for e in audit.entries(event="dataset.import")][-1] == "package"
