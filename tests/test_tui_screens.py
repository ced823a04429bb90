"""The TUI's second slice: Models, Datasets (the vault) and Plan, driven with Pilot against real workspaces."""

from __future__ import annotations

import asyncio
import json

import pytest


from textual.widgets import Checkbox, DataTable, Input, ProgressBar, Static, TabbedContent  # noqa: E402

from appliance import models  # noqa: E402
from appliance.trust import keys
from appliance.trust import audit, signing
from appliance.trust import keyring  # noqa: E402
from tests.test_tui import SIZE, aio, click, text  # noqa: E402
from tui.app import ApplianceApp  # noqa: E402
from tui.errors import ErrorDialog  # noqa: E402
from tui.screens.datasets import ConfirmDialog, DatasetsScreen  # noqa: E402
from tui.screens.plan import PlanScreen  # noqa: E402

FAST = "pbkdf2-sha256"


async def settle(pilot, rounds: int = 3) -> None:
    """Let workers finish and their results reach the widgets (a DirectoryTree's loader waits for ever: not it)."""
    from textual.widgets import DirectoryTree
    from textual.worker import WorkerState

    def busy(w) -> bool:
        return w.state in (WorkerState.PENDING, WorkerState.RUNNING) and not isinstance(w.node, DirectoryTree)

    for _ in range(rounds):
        for _ in range(400):  # at most 20 s
            if not any(busy(w) for w in pilot.app.workers):
                break
            await asyncio.sleep(0.05)
        await pilot.pause()  # the fastest KDF to derive: the tests create and open vaults


def records(n: int = 12) -> list[dict]:
    out = [{"messages": [{"role": "user", "content": f"What is the capital of country number {i} in the list?"},
                         {"role": "assistant", "content": f"The capital of country number {i} is city {i}, "
                                                          "on the river."}]} for i in range(n)]
    out.append(out[0])  # an exact duplicate
    out.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


async def type_into(pilot, selector: str, value: str) -> None:
    field = pilot.app.query_one(selector, Input)
    field.focus()
    field.value = ""
    await pilot.press(*value)


def rendered(app, selector: str) -> str:
    """A Static's content as plain text, rich renderables (tables, groups) included."""
    from rich.console import Console

    content = app.screen.query_one(selector, Static).content
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(content)
    return console.export_text()


def error_message(app) -> str:
    assert isinstance(app.screen, ErrorDialog), type(app.screen)
    return str(app.screen.query_one("#message", Static).render())


# -- datasets ---------------------------------------------------------------------------------

@aio
async def test_datasets_create_unlock_import_browse_and_delete(home, tmp_path):
    src = write_jsonl(tmp_path / "faq.jsonl", records())
    app = ApplianceApp(kdf=FAST)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await settle(pilot)
        screen = app.query_one(DatasetsScreen)
        assert screen.state == "none"

        # Create: two different passphrases are refused; the fields never keep what was typed.
        await type_into(pilot, "#new-pass", "correct horse")
        await type_into(pilot, "#new-pass2", "correct hors")
        await pilot.press("enter")
        await settle(pilot)
        assert "differ" in error_message(app)
        await pilot.press("escape")
        assert app.query_one("#new-pass", Input).value == "" and not keyring.exists()
        await type_into(pilot, "#new-pass", "correct horse")
        await type_into(pilot, "#new-pass2", "correct horse")
        assert "correct horse" not in app.export_screenshot()  # password fields: never echoed
        await pilot.press("enter")
        await settle(pilot)
        assert keyring.exists() and screen.state == "open"
        assert keyring.load()["kdf"]["name"] == FAST

        # Lock, then unlock: a wrong passphrase is the keyring's one sentence; the right one opens it.
        await pilot.press("l")
        await settle(pilot)
        assert screen.state == "locked" and signing.private_raw() is None
        await type_into(pilot, "#pass", "wrong horse")
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith("the passphrase does not open the vault")
        await pilot.press("escape")
        assert screen.state == "locked" and app.query_one("#pass", Input).value == ""
        await type_into(pilot, "#pass", "correct horse")
        await pilot.press("enter")
        await settle(pilot)
        assert screen.state == "open"
        assert "correct horse" not in app.export_screenshot()

        # Import: progress to the end, then the report with the rejected counts.
        app.query_one("#dataset-table", DataTable).focus()
        await pilot.press("i")
        await type_into(pilot, "#ds-path", src)
        await type_into(pilot, "#ds-name", "faq")
        await pilot.press("enter")
        await settle(pilot)
        bar = app.query_one("#ds-progress", ProgressBar)
        assert bar.total == 14 and bar.progress == 14
        report = screen.report
        assert report["records_read"] == 14
        assert report["rejected"]["exact_duplicate"] == 1 and report["rejected"]["too_short"] == 1
        shown = rendered(app, "#ds-output")
        assert "2 record(s) rejected" in shown and "exact duplicate" in shown
        table = app.query_one("#dataset-table", DataTable)
        assert table.get_row_at(0)[0] == "faq"
        assert sum(int(table.get_row_at(0)[i]) for i in (1, 2, 3)) == 12  # train, validation, test
        assert report["imported"] == {"train": 10, "validation": 1, "test": 1}

        # Browse: decrypted records in the scrollable view.
        table.focus()
        await pilot.press("b")
        await settle(pilot)
        assert screen.browsed and "capital of country number" in rendered(app, "#ds-output")

        # Delete: asks first; cancel keeps it, yes crypto-shreds it.
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        assert "crypto-shred dataset faq?" in str(app.screen.query_one("#question", Static).render())
        await pilot.press("escape")
        await settle(pilot)
        assert "faq" in keyring.status()["datasets"]
        await pilot.press("d")
        await pilot.pause()
        await click(pilot, "#yes")
        await settle(pilot)
        assert "faq" not in keyring.status()["datasets"]
        assert app.query_one("#dataset-table", DataTable).row_count == 0
    assert [e["event"] for e in audit.entries()][-3:] == ["dataset.import", "dataset.show", "dataset.delete"]


# -- models -----------------------------------------------------------------------------------

@aio
async def test_models_import_a_folder_and_show_it(vault_home, tiny_model_dir):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        assert app.query_one("#model-table", DataTable).row_count == 0
        app.query_one("#model-table", DataTable).focus()
        await pilot.press("i")
        await type_into(pilot, "#model-path", str(tiny_model_dir))
        await type_into(pilot, "#model-name", "tiny")
        await pilot.press("enter")
        await settle(pilot)
        table = app.query_one("#model-table", DataTable)
        assert table.row_count == 1
        row = table.get_row_at(0)
        assert row[0] == "tiny" and row[1] == "LlamaForCausalLM" and row[4] == "hf"
        assert row[2].endswith("M")  # parameters, from the model's config
        assert "source        hf:" in text(app, "#model-info")
        assert "imported tiny" in text(app, "#model-progress")
    assert [m["id"] for m in models.list_models()] == ["tiny"]


@aio
async def test_models_import_of_a_pickle_only_folder_is_the_dialog(vault_home, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        app.query_one("#model-table", DataTable).focus()
        await pilot.press("i")
        await type_into(pilot, "#model-path", str(folder))
        await pilot.press("enter")
        await settle(pilot)
        assert "pickle" in error_message(app).lower()
        await pilot.press("escape")
        assert "import failed" in text(app, "#model-progress")


@aio
async def test_models_import_with_a_locked_vault_says_where_to_unlock(home, tmp_path):
    keyring.init("correct horse", "pbkdf2-sha256")
    signing.use(None)
    keys.use_vault(None)
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        app.query_one("#model-table", DataTable).focus()
        await pilot.press("i")
        await type_into(pilot, "#model-path", str(tmp_path))
        await pilot.press("enter")
        await settle(pilot)
        assert "unlock it on the Data screen" in error_message(app)


# -- plan -------------------------------------------------------------------------------------

@aio
async def test_plan_draws_the_memory_bars_on_a_profile(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        await type_into(pilot, "#recipe", "recipes/qwen2.5-7b-qlora-1x24gb.yaml")
        app.query_one("#profile").value = "1x-rtx4090"
        await pilot.press("enter")
        await settle(pilot)
        plan = app.query_one(PlanScreen).plan
        assert plan["verdict"] == "fits" and plan["hardware"] == "1x-rtx4090"
        assert text(app, "#plan-summary").startswith("FITS on 1x-rtx4090")
        shown = text(app, "#plan-bars")
        assert "RTX 4090" in shown and "█" in shown and "limit" in shown and "ok" in shown
        assert "strategy:" in text(app, "#plan-details")
        # the recipe leaves checkpointing and the micro-batch to the plan, which says what it chose and why
        assert "chosen by the plan" in text(app, "#plan-details") and "gradient checkpointing on" in text(
            app, "#plan-details")


@aio
async def test_plan_of_a_missing_recipe_is_the_dialog(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        await type_into(pilot, "#recipe", "recipes/nope.yaml")
        await pilot.press("enter")
        await settle(pilot)
        assert "nope.yaml" in error_message(app)
        await pilot.press("escape")
        assert app.query_one(PlanScreen).plan is None


@aio
async def test_train_from_plan_starts_the_run_as_the_cli_does_and_follows_it(home, monkeypatch):
    from tests.test_tui import RUN, write_run
    from tui.screens import plan as plan_screen

    started = []

    def fake_start(path, overrides, allow_shorter, processes, nodes):  # the run: test_tui_pipeline.py; here: the hand-over
        assert (overrides, allow_shorter, processes, nodes) == ({}, False, None, None)  # the form untouched
        started.append(path)
        write_run()
        return RUN

    monkeypatch.setattr(plan_screen, "start_training", fake_start)
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        app.query_one("#plan-view").focus()
        await pilot.press("t")
        await settle(pilot)
        assert started == ["recipes/demo-cpu.yaml"]
        assert app.query_one(TabbedContent).active == "train"
        assert app.query_one("TrainScreen").following == RUN


def test_train_refuses_a_plan_that_does_not_fit_with_the_refusal_sentence(vault_home, monkeypatch):
    from appliance import plan as planner
    from appliance import runs
    from appliance.errors import InvalidInput
    from tui.screens.plan import start_training

    real = planner.plan_recipe
    monkeypatch.setattr(planner, "plan_recipe", lambda recipe, **kw: real(recipe, simulate="1x-t4", limit=0.1))
    monkeypatch.setattr(runs, "create", lambda *a: pytest.fail("a refused plan created a run"))
    with pytest.raises(InvalidInput, match="this run does not fit"):
        start_training("recipes/qwen2.5-32b-qlora-2x24gb.yaml")


# -- snapshots --------------------------------------------------------------------------------

def _fixed_clock(monkeypatch):
    monkeypatch.setattr(audit, "_iso", lambda t: "2026-11-22T09:00:00.000000Z")
    monkeypatch.setattr(audit, "_user", lambda: "analyst")


def test_snapshot_models(vault_home, tiny_model_dir, monkeypatch, snap_compare):
    import tui.screens.models

    models.import_model(tiny_model_dir, "tiny")
    # The manifest's creation time and the fixture's path change per run: the detail pane shows them. Replaced at
    # the source, since the table's row-highlighted message may redraw the pane after the workers are done.
    monkeypatch.setattr(tui.screens.models, "detail_text", lambda row: "tiny: LlamaForCausalLM, 2 layers, hidden 128")

    async def run_before(pilot):
        await pilot.press("3")
        await settle(pilot)
        # The shot waits for what it shows, not for a time: the row listed, the table focused, its detail drawn,
        # and the columns sized to the row (a DataTable measures new rows when its queue is idle: on a busy machine
        # the shot could come first, with the columns as wide as their headers).
        table = pilot.app.query_one("#model-table", DataTable)
        for _ in range(400):
            if (table.row_count == 1 and pilot.app.focused is table
                    and table.ordered_columns[0].content_width >= len("tiny")
                    and "hidden 128" in str(pilot.app.query_one("#model-info", Static).render())):
                break
            await asyncio.sleep(0.05)
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(ApplianceApp(simulate="cpu-only"), terminal_size=SIZE, run_before=run_before)


def test_snapshot_datasets_create_form(home, snap_compare):
    async def run_before(pilot):
        await pilot.press("4")
        await settle(pilot)
        for field in pilot.app.query(Input):
            field.cursor_blink = False  # shown steadily: a blinking cursor would depend on the moment of the shot
        await pilot.pause()

    assert snap_compare(ApplianceApp(simulate="cpu-only"), terminal_size=SIZE, run_before=run_before)


def test_snapshot_plan(home, snap_compare, monkeypatch):
    from appliance import hardware

    monkeypatch.setattr(hardware, "_disk_free", lambda: 500 * 2**30)  # the plan's disk line shows this machine's

    async def run_before(pilot):
        await pilot.press("5")
        await settle(pilot)
        pilot.app.query_one("#recipe", Input).value = "recipes/qwen2.5-7b-qlora-1x24gb.yaml"
        pilot.app.query_one("#profile").value = "1x-rtx4090"
        pilot.app.query_one(PlanScreen).action_plan()
        await settle(pilot)
        pilot.app.query_one("#plan-view").focus()
        await pilot.pause()
        await asyncio.sleep(0)

    assert snap_compare(ApplianceApp(), terminal_size=SIZE, run_before=run_before)


@aio
async def test_plan_form_plans_from_a_model_config_before_the_weights_are_here(home, tiny_model_dir, tmp_path):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        await pilot.press("k")
        await settle(pilot)
        screen = app.query_one(PlanScreen)
        await type_into(pilot, "#k-config", str(tiny_model_dir / "config.json"))  # as `plan --model-config`
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["model"]["layers"] == 2 and screen.plan["model"]["hidden"] == 128
        assert f"model shape from {tiny_model_dir / 'config.json'}" in " ".join(
            str(app.query_one("#plan-summary", Static).render()).split())
        await type_into(pilot, "#k-config", str(tmp_path / "nowhere" / "config.json"))
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert error_message(app) == (f"{tmp_path / 'nowhere' / 'config.json'} does not exist; give the base "
                                      "model's config.json (or its folder).")


async def toggle(pilot, selector: str) -> None:
    """Tick or untick a checkbox from the keyboard (space), and wait until it has flipped."""
    box = pilot.app.query_one(selector, Checkbox)
    before = box.value
    box.focus()
    await pilot.press("space")
    for _ in range(250):
        if box.value != before:
            return
        await pilot.pause(0.02)
    raise AssertionError(f"{selector} did not flip")


@aio
async def test_plan_form_overrides_the_recipe_and_a_bad_number_names_its_field(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        await pilot.press("k")
        await settle(pilot)
        screen = app.query_one(PlanScreen)
        assert app.query_one("#k-steps", Input).placeholder == "40"  # the demo recipe's own value
        await type_into(pilot, "#k-rank", "64")
        await type_into(pilot, "#k-lr", "0.0005")
        assert screen.overrides() == {"lora.r": 64, "training.learning_rate": 0.0005}
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["knobs"]["lora_r"] == 64
        # the demo recipe leaves the micro-batch to the plan; a stated one keeps the batch with accumulation
        assert app.query_one("#k-batch", Input).placeholder == "auto"
        await type_into(pilot, "#k-batch", "2")
        await toggle(pilot, "#k-packing")
        assert screen.overrides() == {"lora.r": 64, "training.learning_rate": 0.0005,
                                      "training.micro_batch_size": 2, "training.packing": False}
        await click(pilot, "#plan-go")
        await settle(pilot)
        k = screen.plan["knobs"]
        assert (k["micro_batch"], k["grad_accum"], k["packing"]) == (2, 4, False)
        await type_into(pilot, "#k-batch", "auto")
        await toggle(pilot, "#k-packing")
        assert "training.packing" not in screen.overrides()
        assert screen.overrides()["training.micro_batch_size"] == "auto"
        await type_into(pilot, "#k-limit", "0.5")
        app.query_one("#plan-view").focus()
        await pilot.press("p")
        await settle(pilot)
        assert screen.plan["limit_fraction"] == 0.5
        await type_into(pilot, "#k-lr", "fast")
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert error_message(app).startswith("Plan: learning rate must be a number, not 'fast'")
        await pilot.press("escape")
        await type_into(pilot, "#k-lr", "")
        await type_into(pilot, "#k-limit", "2")
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert error_message(app).startswith("Plan: memory limit must be a share of each device's memory")


@aio
async def test_models_imports_the_embedded_default_with_one_key(vault_home):
    """The pipeline on the embedded default from the UI alone starts here: `e` imports SmolLM2-135M-Instruct under
    the id the demo recipe names."""
    from appliance.demo import MODEL_ID

    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        assert "embedded default" in str(app.query_one("#model-info", Static).render())
        await pilot.press("e")
        await settle(pilot, rounds=12)  # dequantizing 135M parameters to bfloat16
        assert not isinstance(app.screen, ErrorDialog)
        assert [m["id"] for m in models.list_models()] == [MODEL_ID]
        table = app.query_one("#model-table", DataTable)
        assert table.get_row_at(0)[0] == MODEL_ID


def test_the_plan_screens_machines_field_reads_node_rank_count_and_rendezvous(home):
    from appliance import cluster
    from appliance.errors import InvalidInput
    from tui.screens.plan import parse_nodes

    assert parse_nodes("  ") is None
    assert parse_nodes("1/2@127.0.0.1:29400") == {"nnodes": 2, "node_rank": 1, "rdzv": "127.0.0.1:29400"}
    with pytest.raises(InvalidInput, match="R/M@HOST:PORT"):
        parse_nodes("node 1 of 2")
    with pytest.raises(InvalidInput, match="--node-rank 2: with --nnodes 2 use 0 to 1"):
        parse_nodes("2/2@127.0.0.1:29400")
    with pytest.raises(InvalidInput, match="not a declared peer"):
        parse_nodes("1/2@10.0.0.9:29400")
    cluster.allow(["10.0.0.9:29400"])
    assert parse_nodes("1/2@10.0.0.9:29400")["rdzv"] == "10.0.0.9:29400"


async def plan_form(pilot, recipe: str, profile: str) -> PlanScreen:
    """The Plan screen with ``recipe`` on a simulated ``profile``, its knobs open and showing the recipe's values."""
    await pilot.press("5")
    await settle(pilot)
    screen = pilot.app.query_one(PlanScreen)
    pilot.app.query_one("#recipe", Input).value = recipe
    pilot.app.query_one("#profile").value = profile
    screen.load_defaults()
    await settle(pilot)
    await pilot.press("k")
    await settle(pilot)
    return screen


@aio
async def test_plan_form_chooses_the_strategy_and_fsdp_offload(home):
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await plan_form(pilot, "recipes/qwen2.5-32b-qlora-2x24gb.yaml", "2x-rtx4090")
        assert app.query_one("#k-strategy").prompt == "strategy auto" and screen.overrides() == {}
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["strategy"]["mode"] == "fsdp" and "host" in screen.plan
        assert "strategy: fsdp" in " ".join(str(app.query_one("#plan-details", Static).render()).split())
        app.query_one("#k-strategy").value = "split"
        await toggle(pilot, "#k-offload")
        assert screen.overrides() == {"training.strategy": "split", "training.fsdp_cpu_offload": True}
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["strategy"]["mode"] == "split" and screen.plan["knobs"]["cpu_offload"]
        # The recipe keeps its two newest checkpoints (an FSDP checkpoint holds the whole 4-bit model)
        assert app.query_one("#k-keep", Input).placeholder == "2"
        await type_into(pilot, "#k-keep", "1")
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert "training.keep_checkpoints: must be 2 or more" in error_message(app)


@aio
async def test_plan_form_sets_the_compute_dtype_and_shows_the_choice(home):
    """The demo recipe leaves the dtype to the plan (auto); the form overrides it, and on a CPU without native
    bfloat16 (the simulated AVX2 box) the plan's details say what it chose and why."""
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await plan_form(pilot, "recipes/demo-cpu.yaml", "cpu-avx2")
        assert app.query_one("#k-dtype").prompt == "compute auto" and screen.overrides() == {}
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["knobs"]["compute_dtype"] == "float32" and screen.plan["verdict"] == "fits"
        details = " ".join(str(app.query_one("#plan-details", Static).render()).split())
        assert "compute dtype float32" in details and "no AVX512-BF16 or AMX-BF16" in details
        app.query_one("#k-dtype").value = "bfloat16"
        assert screen.overrides() == {"quantization.compute_dtype": "bfloat16"}
        await click(pilot, "#plan-go")
        await settle(pilot)
        assert screen.plan["verdict"] == "fits_after_adjustment"
        assert "compute dtype bfloat16 -> float32" in " ".join(str(app.query_one("#plan-details", Static).render()).split())
