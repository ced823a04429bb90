"""The Eval and Export screens, driven with Pilot against the real exported workspace of the fixtures.

The tiny model evaluates and exports in seconds: the tests run the real library (evaluate, export, bundle, verify)
through the screens' keys and check what the screens show against what the library wrote. Snapshots use a
workspace written file by file (fixed run ids, reports and sizes), so nothing in them depends on the clock.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest


from textual.widgets import DataTable, Input, Log, ProgressBar, Select, SelectionList, Static, TabbedContent  # noqa: E402

from appliance import data  # noqa: E402
from appliance.trust import keys, signing  # noqa: E402
from appliance.workspace import folder, read_json, write_json  # noqa: E402
from tests.test_tui import RUN, SIZE, _snapshot_app, aio, write_run  # noqa: E402
from tests.test_tui_screens import error_message, rendered, settle, type_into  # noqa: E402
from tui.app import ApplianceApp  # noqa: E402
from tui.errors import ErrorDialog  # noqa: E402
from tui.screens.evaluate import EvaluateScreen  # noqa: E402
from appliance.evaluate import names  # noqa: E402
from tui.screens.export import BITS, ExportScreen, estimate_bytes, size  # noqa: E402

LOCKED = "the vault is locked in this session; unlock it on the Data screen (key 4) first."


async def until(pilot, done, timeout: float = 240.0) -> None:
    """Wait for a long worker (an evaluation, an export) to finish; its result is on screen after."""
    end = time.monotonic() + timeout
    while not done():
        if isinstance(pilot.app.screen, ErrorDialog):  # the work failed: say why at once
            pytest.fail(f"error dialog: {error_message(pilot.app)}")
        assert time.monotonic() < end, "the work did not finish in time"
        await asyncio.sleep(0.1)
    await settle(pilot)


async def open_screen(pilot, key: str) -> None:
    await settle(pilot)  # the app's first tab is activated before a key switches away from it
    await pilot.press(key)
    await settle(pilot)


# -- evaluate ---------------------------------------------------------------------------------

@aio
async def test_evaluate_shows_base_against_tuned_with_live_progress(exported_home):
    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "7")
        screen = app.query_one(EvaluateScreen)
        table = app.query_one("#ev-runs", DataTable)
        assert table.get_row_at(0)[:2] == [run_id, "finished"]
        assert table.get_row_at(0)[3:] == ["f16", "-"]  # exported, never evaluated
        assert "not evaluated yet" in text_of(app, "#ev-report")

        await pilot.press("s")  # the samples field, then Enter evaluates
        assert app.focused is app.query_one("#ev-samples", Input)
        await type_into(pilot, "#ev-samples", "4")
        await pilot.press("enter")
        await until(pilot, lambda: screen.report is not None)

        report = screen.report
        assert report["samples"] == 4
        assert read_json(home / "runs" / run_id / "eval.json") == {k: v for k, v in report.items() if k != "examples"}
        # progress: every prompt of both models, and the bar full
        assert screen.progress_events == 2 * 4
        bar = app.query_one("#ev-bar", ProgressBar)
        assert bar.total == bar.progress == 8
        shown = text_of(app, "#ev-report")
        assert "4 examples" in shown
        assert "test split" in shown and "95% interval" in shown and {"perplexity", "rouge_l", "chrf", "bleu"} <= set(report["metrics"])
        for m in report["metrics"]:
            b, t = report["base"][m], report["tuned"][m]
            line = next(x for x in shown.splitlines() if x.startswith(names.label(m) + "  "))
            assert f"{names.value(m, b):>7}  {names.value(m, t):>7}  {names.delta(m, t - b):>11}" in line, line
            assert names.span(m, report["differences"][m]) in line
        # the held-out examples side by side: prompt and reference from the split, the answers from the report
        examples = rendered(app, "#ev-examples")
        assert all(h in examples for h in ("prompt", "reference", "base", "tuned"))
        first = data.load_split(app_recipe_dataset(run_id), "test")[0]["messages"][-1]["content"]
        assert " ".join(first.split())[:12] in " ".join(examples.split()).replace("│ ", "")
        assert table.get_row_at(0)[4] == "4 samples"  # the list re-read: eval.json is there now


@aio
async def test_evaluate_with_a_judge_then_a_blind_review_in_the_dialog(exported_home):
    import getpass

    from tui.screens.evaluate import ReviewDialog

    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "7")
        screen = app.query_one(EvaluateScreen)
        app.query_one("#ev-samples", Input).value = "3"
        await type_into(pilot, "#ev-judge", "tiny")
        await pilot.press("enter")
        await until(pilot, lambda: screen.report is not None)
        assert screen.report["judge"]["items"] == 3 and screen.progress_events == 3 * 3
        bar = app.query_one("#ev-bar", ProgressBar)
        assert bar.total == bar.progress == 9
        assert "judge tiny" in text_of(app, "#ev-report") and "consistency" in text_of(app, "#ev-report")

        app.query_one("#ev-runs", DataTable).focus()
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, ReviewDialog) or bool(
            read_json(home / "runs" / run_id / "eval.json").get("reviews")))
        if isinstance(app.screen, ReviewDialog):  # (nothing to show when the tiny model answered alike)
            shown = str(app.screen.query_one("#rv-text", Static).render())
            assert "A:" in shown and "B:" in shown and "reference:" in shown and "tuned" not in shown
            await pilot.press("t")
            await pilot.press("escape")
            await settle(pilot)
        assert not isinstance(app.screen, ReviewDialog)
        reviews = read_json(home / "runs" / run_id / "eval.json")["reviews"]
        assert len(reviews) == 1 and reviews[0]["reviewer"] == getpass.getuser()
        await until(pilot, lambda: "review by" in text_of(app, "#ev-report"))


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def app_recipe_dataset(run_id: str):
    from appliance import runs

    return runs.load_recipe(run_id).dataset_path()


# -- export -----------------------------------------------------------------------------------

@aio
async def test_export_again_shows_files_sizes_parity_and_estimates(exported_home):
    from appliance import plan

    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "8")
        screen = app.query_one(ExportScreen)
        quants = app.query_one("#ex-quants", SelectionList)
        assert quants.selected == ["f16", "q8_0"]  # the recipe's export.quant
        before = read_json(home / "runs" / run_id / "export.json")
        assert f"top-1 {before['files']['q8_0']['top1_agreement']:.1%} (measured)" in str(
            quants.get_option_at_index(2).prompt)
        assert "6.6M parameters of tiny" in text_of(app, "#ex-note")
        # the previous export's results are shown at once
        assert f"{before['parity']['positions']} positions" in text_of(app, "#ex-results")

        # keyboard only: Enter on the run moves to the list; uncheck q8_0, check q4_0, export
        await pilot.press("enter")
        assert app.focused is quants
        await pilot.press("down", "down", "space", "down", "down", "down", "space")
        assert quants.selected == ["f16", "q4_0"]
        await pilot.press("e")
        await until(pilot, lambda: screen.result is not None)

        result = read_json(home / "runs" / run_id / "export.json")
        assert screen.result == result and list(result["files"]) == ["f16", "q4_0"]
        assert not (home / "runs" / run_id / "gguf" / "model-q8_0.gguf").exists()  # an export replaces the files
        assert app.query_one("#ex-tabs", TabbedContent).active == "ex-results-tab"
        shown = text_of(app, "#ex-results")
        lines = shown.splitlines()
        for q, f in result["files"].items():
            row = next(x for x in lines if x.startswith(q + " "))
            assert size(f["bytes"]) in row and f"{f['top1_agreement']:.2%}" in row, row
        p = result["parity"]
        assert f"identical to training's on {p['template_conversations']} conversations" in shown
        assert f"{p['eot_token']!r} (id {p['eot_token_id']}) ends generation" in shown
        assert f"f16 top-1 agreement {p['top1_agreement']:.2%} over {p['positions']} positions" in shown
        assert f"q4_0 top-1 agreement {result['files']['q4_0']['top1_agreement']:.2%}" in shown
        # the estimates are close to the real files (the tokenizer is most of the tiny model's metadata)
        shape = plan.load_shape("tiny")[0]
        for q, f in result["files"].items():
            assert abs(estimate_bytes(shape, q) - f["bytes"]) / f["bytes"] < 0.05, (q, f["bytes"])
        # progress: the stages (convert, quantize, check: the run was merged already), and the live log
        bar = app.query_one("#ex-bar", ProgressBar)
        assert bar.total == bar.progress == 3
        log = "\n".join(str(line) for line in app.query_one("#ex-log", Log).lines)
        assert "» quantizing to q4_0" in log and "✓ exported f16, q4_0" in log
        assert app.query_one("#ex-runs", DataTable).get_row_at(0)[2] == "f16, q4_0"
        assert "(measured)" in str(quants.get_option_at_index(5).prompt)  # q4_0 now measured


def test_estimates_follow_the_bits_per_weight_of_a_large_model():
    from appliance.plan import Shape

    shape = Shape("7b", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000,
                  tied=False)
    sizes = {q: estimate_bytes(shape, q) for q in BITS}
    assert 12.5e9 < sizes["f16"] < 13.8e9  # 6.7B parameters x 2 bytes
    assert sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q5_k_m"] > sizes["q4_k_m"] > sizes["q4_0"]
    assert 3.7e9 < sizes["q4_0"] < 4.1e9 and 4.0e9 < sizes["q4_k_m"] < 4.3e9


# -- bundle and lineage -----------------------------------------------------------------------

@aio
async def test_bundle_auto_picks_the_quant_that_fits_a_max_size(exported_home, tmp_path):
    home, run_id = exported_home
    by = read_json(home / "runs" / run_id / "export.json")["quality"]["by_quant"]
    out = tmp_path / "edge-auto"
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "8")
        screen = app.query_one(ExportScreen)
        assert "quality per quantization" in text_of(app, "#ex-results") and "KL vs f16" in text_of(app, "#ex-results")
        await pilot.press("b")
        app.query_one("#ex-bundle-quant", Select).value = "auto"
        app.query_one("#ex-bundle-max", Input).value = str((by["f16"]["bytes"] + by["q8_0"]["bytes"]) // 2)
        await type_into(pilot, "#ex-bundle-out", str(out))
        await pilot.press("enter")
        await until(pilot, lambda: screen.bundled is not None)
        assert screen.bundled["quant"] == "q8_0" and (out / "model-q8_0.gguf").is_file()
        assert "auto chose q8_0" in " ".join(text_of(app, "#ex-bundle-result").split())


@aio
async def test_bundle_shows_the_key_and_lineage_verifies(exported_home, tmp_path):
    home, run_id = exported_home
    out = tmp_path / "edge"
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "8")
        screen = app.query_one(ExportScreen)
        await pilot.press("b")  # no folder named yet: the form opens
        assert app.query_one("#ex-tabs", TabbedContent).active == "ex-bundle"
        assert app.focused is app.query_one("#ex-bundle-out", Input)
        assert app.query_one("#ex-bundle-quant", Select).value == "q8_0"  # the smallest exported file
        await type_into(pilot, "#ex-bundle-out", str(out))
        await pilot.press("enter")
        await until(pilot, lambda: screen.bundled is not None)

        assert (out / "SHA256SUMS").is_file() and (out / "model-q8_0.gguf").is_file()
        key = signing.fingerprint(signing.workspace_public())
        assert screen.bundled["key"] == key
        shown = " ".join(text_of(app, "#ex-bundle-result").split())
        assert key in shown and f"appliance bundle verify DIR --fingerprint {key}" in shown

        app.query_one("#ex-runs", DataTable).focus()
        await pilot.press("l")  # the run's GGUF, back through its ancestors
        await until(pilot, lambda: screen.verified is not None)
        assert app.query_one("#ex-tabs", TabbedContent).active == "ex-lineage-tab"
        table = app.query_one("#ex-lineage", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert rows[0][:3] == ["ok", "artifact", "gguf"] and rows[0][3] == f"{run_id}/gguf"
        kinds = {r[2] for r in rows if r[0] == "ok"}
        assert {"gguf", "merged-model", "adapter", "run", "model"} <= kinds
        assert not any("BAD" in r[0] for r in rows)
        assert text_of(app, "#ex-verify-info").startswith("lineage ok")

        screen.verified = None  # the bundle itself, as `appliance bundle verify DIR` checks it
        await type_into(pilot, "#ex-verify-path", str(out))
        await pilot.press("enter")
        await until(pilot, lambda: screen.verified is not None)
        assert text_of(app, "#ex-verify-info").startswith("bundle intact")
        assert table.get_row_at(0)[:2] == ["ok", "bundle"]

        # Against the fingerprint `bundle` printed (as `bundle verify DIR --fingerprint`), in aa:bb pairs too.
        screen.verified = None
        await type_into(pilot, "#ex-verify-key", ":".join(key[i:i + 2] for i in range(0, 64, 2)).upper())
        await pilot.press("enter")
        await until(pilot, lambda: screen.verified is not None)
        assert screen.verified["trusted"] and "compare its fingerprint" not in text_of(app, "#ex-verify-info")
        other = "0" * 64
        await type_into(pilot, "#ex-verify-key", other)
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app) == (f"the bundle's key {key[:16]}... is not the trusted fingerprint "
                                      f"{other[:16]}...; do not use this bundle.")
        await pilot.press("escape")
        pub = signing.export_public(signing.new_private()[1], tmp_path / "other.pub")  # a pinned key, not this one
        await type_into(pilot, "#ex-verify-key", str(pub))
        await pilot.press("enter")
        await settle(pilot)
        assert error_message(app).startswith(f"{out / 'signing-key.pub'} is not the trusted key")


# -- mistakes and a locked vault --------------------------------------------------------------

@aio
async def test_a_locked_vault_and_user_mistakes_are_one_sentence_dialogs(exported_home):
    home, run_id = exported_home
    keys.use_vault(None)
    signing.use(None)
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "7")
        await pilot.press("e")
        await settle(pilot)
        assert error_message(app) == LOCKED
        await pilot.press("escape")
        screen = app.query_one(EvaluateScreen)
        assert screen.working is None and "failed" in str(app.query_one("#ev-stage").render())

        await type_into(pilot, "#ev-samples", "0")
        await pilot.press("enter")
        assert error_message(app).startswith("the number of test samples must be a whole number")
        await pilot.press("escape")

        app.query_one("#ev-runs", DataTable).focus()  # (in the samples field, 8 is a digit)
        await open_screen(pilot, "8")
        await pilot.press("e")
        await settle(pilot)
        assert error_message(app) == LOCKED
        await pilot.press("escape")
        assert app.query_one(ExportScreen).working is None
        app.query_one("#ex-quants", SelectionList).deselect_all()
        app.query_one("#ex-runs", DataTable).focus()
        await pilot.press("e")
        assert error_message(app) == "check at least one quantization (space toggles the highlighted one)."
        await pilot.press("escape")
        assert not (home / "runs" / run_id / "eval.json").exists()


@aio
async def test_a_run_without_gguf_says_to_export_it_first(home):
    write_run()
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "7")
        assert "has no f16 GGUF yet" in text_of(app, "#ev-report")
        await pilot.press("e")
        assert error_message(app) == f"run {RUN} has no f16 GGUF; export it on the Export screen (key 8) first."


@aio
async def test_an_empty_workspace_says_to_train_first(home):
    from tui.screens import evaluate, export

    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "7")
        assert str(app.query_one("#ev-stage").render()) == evaluate.NO_RUNS
        await pilot.press("e")
        assert error_message(app) == "there is no run to evaluate; train one on the Plan screen (key 5) first."
        await pilot.press("escape")
        await open_screen(pilot, "8")
        assert str(app.query_one("#ex-stage").render()) == export.NO_RUNS
        no_run = "there is no finished run here; train one on the Plan screen (key 5) first."
        for key, said in (("e", no_run), ("m", no_run), ("l", "select a finished run, or name an artifact folder "
                                                              "to verify.")):
            await pilot.press(key)
            assert error_message(app) == said
            await pilot.press("escape")


# -- snapshots (pytest-textual-snapshot; update with --snapshot-update) ---------------------------

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 128,
               "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "tie_word_embeddings": True, "dtype": "float32"}


def _snapshot_workspace() -> None:
    """Two runs written file by file (fixed ids, times, reports and sizes): one finished, evaluated and exported to
    f16 and q8_0, one interrupted."""
    path = write_run()
    write_run("tiny-20261122-100000-ef01", losses=(3.1,), finished=False)
    write_json(path / "recipe.json", {"name": "tiny", "base_model": "tiny", "dataset": "claims",
                                      "export": {"quant": ["f16", "q8_0"], "parity_samples": 4}})
    (folder("models") / "tiny").mkdir(parents=True)
    write_json(folder("models") / "tiny" / "config.json", TINY_CONFIG)
    metrics = ["exact_match", "token_f1", "valid_json", "exact_keys", "field_accuracy"]
    write_json(path / "eval.json", {
        "samples": 48, "metrics": metrics,
        "base": dict(zip(metrics, (0.0, 0.2125, 0.0625, 0.0, 0.0312))),
        "tuned": dict(zip(metrics, (0.375, 0.8731, 1.0, 0.9792, 0.8958))),
        "improved": metrics, "tuned_beats_base": True})
    gguf = f"/home/analyst/.local/share/appliance/runs/{RUN}/gguf"
    write_json(path / "export.json", {
        "files": {"f16": {"path": f"{gguf}/model-f16.gguf", "bytes": 14945760, "top1_agreement": 0.9974554707379135},
                  "q8_0": {"path": f"{gguf}/model-q8_0.gguf", "bytes": 8771040, "top1_agreement": 0.9312977099236641}},
        "parity": {"eot_token": "<|im_end|>", "eot_token_id": 2, "positions": 393, "template_conversations": 4,
                   "top1_agreement": 0.9974554707379135}})
    write_json(path / "merge.json", {"dtype": "float32", "max_abs_logit_diff": 1.12e-05, "positions": 777,
                                     "prompts": 8, "path": f"/home/analyst/.local/share/appliance/runs/{RUN}/merged"})
    for part, name in (("gguf", "model-f16.gguf"), ("gguf", "model-q8_0.gguf"), ("merged", "manifest.json")):
        (path / part).mkdir(exist_ok=True)
        (path / part / name).write_text("{}")  # (the screens look at which files exist, not into them)
    assert json.loads((path / "export.json").read_text())["files"]["q8_0"]["bytes"] == 8771040


def test_snapshot_evaluate(home, snap_compare):
    _snapshot_workspace()

    async def run_before(pilot):
        await open_screen(pilot, "7")
        await asyncio.sleep(0)

    assert snap_compare(_snapshot_app(), terminal_size=SIZE, run_before=run_before)


@pytest.mark.parametrize("tab", ["ex-quantize", "ex-results-tab"])
def test_snapshot_export(tab, home, snap_compare):
    _snapshot_workspace()

    async def run_before(pilot):
        await open_screen(pilot, "8")
        pilot.app.query_one("#ex-tabs", TabbedContent).active = tab
        await settle(pilot)
        pilot.app.query_one("#ex-runs", DataTable).focus()
        await pilot.pause()
        await asyncio.sleep(0)

    assert snap_compare(_snapshot_app(), terminal_size=SIZE, run_before=run_before)
