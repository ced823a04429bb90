"""The whole pipeline driven from the TUI alone, headless with Pilot, on the tiny model: import a dataset into the
vault, plan a recipe with the form's overrides, train it and watch the chart update, export it, and chat with it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest


from textual.widgets import Input, Select, TabbedContent  # noqa: E402

from conftest import write_recipe  # noqa: E402
from tests.test_tui import SIZE, aio, click  # noqa: E402
from tests.test_tui_screens import error_message, settle, type_into  # noqa: E402
from tui.app import ApplianceApp  # noqa: E402
from tui.errors import ErrorDialog  # noqa: E402


async def until(pilot, done, what: str, timeout: float = 300.0, then_settle: bool = True) -> None:
    """Wait for long work (a training run, an export, an answer) without keeping the UI thread busy; then let
    the other workers finish (not while a run is followed: that worker lasts as long as the run)."""
    end = time.monotonic() + timeout
    while not done():
        if isinstance(pilot.app.screen, ErrorDialog):
            pytest.fail(f"error dialog while waiting for {what}: {error_message(pilot.app)}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    if then_settle:
        await settle(pilot)


@aio
async def test_the_whole_pipeline_from_the_tui_alone(tiny_home, tmp_path, demo_dataset):
    from appliance import runs
    from appliance.trust import audit
    from appliance.trust import keyring

    home = tiny_home
    records = tmp_path / "claims.jsonl"  # a file from removable media: the demo's records
    records.write_text((demo_dataset / "train.jsonl").read_text())
    # The recipe names a plain folder; the Plan form points it at the vault's dataset instead.
    recipe = write_recipe(tmp_path / "tiny.yaml", demo_dataset, max_steps=4, save_steps=8, eval_steps=8)

    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)

        # Data: import the file into the (open) vault.
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("i")
        await type_into(pilot, "#ds-path", str(records))
        await type_into(pilot, "#ds-name", "claims")
        await pilot.press("enter")
        await until(pilot, lambda: "claims" in keyring.status()["datasets"], "the import")
        assert (home / "datasets" / "claims").is_dir()

        # Plan: the recipe, with the vault's dataset chosen in the form; then train it from there.
        await pilot.press("5")
        await settle(pilot)
        app.query_one("#recipe", Input).value = str(recipe)
        await settle(pilot)
        await pilot.press("k")  # the form: base model, dataset, knobs
        await settle(pilot)
        app.query_one("#k-dataset", Select).value = "claims"
        await type_into(pilot, "#k-steps", "24")  # long enough to watch
        await click(pilot, "#plan-go")
        await until(pilot, lambda: app.query_one("PlanScreen").plan is not None, "the plan")
        plan = app.query_one("PlanScreen").plan
        assert plan["verdict"] in ("fits", "fits_after_adjustment")
        await click(pilot, "#train-go")

        # Train: the app follows the new run; the chart fills as the steps come in.
        await until(pilot, lambda: app.query_one(TabbedContent).active == "train", "the Train screen",
                    then_settle=False)
        train = app.query_one("TrainScreen")
        run_id = train.following
        assert run_id
        seen: set[int] = set()

        def progressing() -> bool:
            seen.add(len(train.view.train))
            return train.view.ended is not None and runs.status(run_id)["state"] == "finished"

        await until(pilot, progressing, "the run to finish", then_settle=False)
        await settle(pilot)
        assert len(seen) >= 3, seen  # the chart grew while the run trained, not once at the end
        assert sorted(train.view.train) == list(range(1, 25)) and sorted(train.view.val) == [8, 16, 24]
        assert train.drawn >= 2
        recipe_used = runs.load_recipe(run_id)
        assert recipe_used.dataset == "claims" and recipe_used.training.max_steps == 24

        # Export: the recipe's quantizations (f16, q8_0), merged first; the parity checks shown.
        await pilot.press("8")
        await settle(pilot)
        export = app.query_one("ExportScreen")
        assert export.selected() == run_id
        await pilot.press("e")
        await until(pilot, lambda: export.result is not None, "the export")
        result = json.loads((home / "runs" / run_id / "export.json").read_text())
        assert set(result["files"]) == {"f16", "q8_0"} and result["parity"]["top1_agreement"] >= 0.99
        shown = str(app.query_one("#ex-results").render())
        assert f"{result['parity']['top1_agreement']:.2%}" in shown

        # Chat: the newest exported run is chosen; an answer streams in from its GGUF through llama.cpp.
        await pilot.press("9")
        await settle(pilot)
        chat = app.query_one("ChatScreen")
        assert chat.wanted()["tuned"].endswith("model-q8_0.gguf")
        prompt = app.query_one("#prompt", Input)
        prompt.focus()
        prompt.value = "Convert this record to JSON: Ada Weber, 41, baker in Graz."
        await pilot.press("enter")
        await until(pilot, lambda: not chat.busy and chat.last_results, "the answer")
        answer = chat.last_results["tuned"]
        assert answer["completion_tokens"] >= 1
        await pilot.press("alt+1")  # (the message field has the focus) leaving Chat closes the model
        dashboard = app.query_one("Dashboard")
        await until(pilot, lambda: dashboard.summary.exported == [run_id], "the dashboard to count the export")
        assert "Chat screen" in str(app.query_one("#next").render())  # the next step: chat with it

    events = {e["event"] for e in audit.entries()}
    assert {"dataset.import", "plan", "train.start", "train.finish", "merge", "export", "chat"} <= events


@aio
async def test_every_screen_at_80x24_keeps_its_tabs_and_its_footer(exported_home):
    """The smallest terminal the UI supports, on a workspace with a trained and exported run: every screen still
    shows all the tabs and its whole footer, up to "q quit" (what is cut off first when a footer is too long)."""
    from tui.app import SCREENS

    app = ApplianceApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        for tab, title, key, _ in SCREENS:
            await pilot.press(f"alt+{key}")
            await settle(pilot)
            assert app.query_one(TabbedContent).active == tab
            assert not isinstance(app.screen, ErrorDialog), error_message(app)
            lines = screen_text(app)
            assert all(t in lines[1] for _, t, _, _ in SCREENS), (tab, lines[1])  # the tab bar, whole
            footer = lines[-1].rstrip()
            assert footer.endswith("palette"), (tab, footer)
            # (In a text field the plain keys type, so the footer rightly leaves q, ? and 1-0 out.)
            assert "q quit" in footer or isinstance(app.focused, Input), (tab, footer)


def screen_text(app) -> list[str]:
    """What the terminal shows, line by line (the compositor's rendering, without styles)."""
    from rich.console import Console

    console = Console(width=app.size.width, height=app.size.height, record=True, file=open("/dev/null", "w"),
                      color_system=None, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text().splitlines()
