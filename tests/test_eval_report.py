"""Issue 15: eval.html, a self-contained report that opens in headless Chromium with no network and shows its
charts; dataset text only when asked for."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess


from conftest import cli_json, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dom(page, tmp_path) -> str:
    """The page as headless Chromium renders it, in an empty network namespace (no network at all) when the
    machine allows it (root), so nothing on the page could have been fetched."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", page.as_uri()]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "-n", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_eval_html_opens_offline_in_chromium_with_its_charts(exported_home, tmp_path):
    # Required, not skipped (issue 26): scripts/test.sh installs Debian's chromium; a machine without it fails here.
    assert CHROMIUM, "Chromium is not installed: scripts/test.sh installs Debian's (apt-get install chromium)"
    home, run_id = exported_home
    cli_json("eval", run_id, "--samples", "4", "--general", "12", "--judge", "tiny", home=home)
    from appliance.evaluate.review import Review

    r = Review(run_id, "dana", seed=1)
    while r.current() is not None:
        r.vote("a")
    r.save()  # the tally joins the page
    page = home / "runs" / run_id / "eval.html"
    text = page.read_text()
    assert not re.search(r"(https?:)?//|<script|<link|@import|url\(", text)  # nothing to fetch, nothing to run
    dom = _dom(page, tmp_path)
    for chart in ("chart-loss", "chart-metrics", "chart-forgetting", "chart-judge", "chart-quants"):
        assert f'id="{chart}"' in dom, chart
    assert dom.count('class="bar"') >= 2 * 8  # base and tuned for every metric
    assert 'data-name="training loss"' in dom and 'data-name="validation loss"' in dom
    assert "review by dana" in dom and "Judge <b>tiny" in dom and "withheld" in dom
    saved = json.loads((home / "runs" / run_id / "eval.json").read_text())
    assert saved["html"] == str(page)


def test_examples_reach_the_page_only_when_asked_and_are_audited(exported_home):
    from appliance import data, runs
    from appliance.trust import audit

    home, run_id = exported_home
    reference = data.load_split(runs.load_recipe(run_id).dataset_path(), "test")[0]["messages"][-1]["content"]
    cli_json("eval", run_id, "--samples", "2", "--general", "0", home=home)
    page = (home / "runs" / run_id / "eval.html").read_text()
    assert reference not in page and "Forgetting check" in page and "not run" in page
    run_cli("eval", run_id, "--samples", "2", "--general", "0", "--examples", "2", home=home)
    page = (home / "runs" / run_id / "eval.html").read_text()
    import html

    assert html.escape(reference) in page
    assert audit.entries(event="eval")[-1]["details"]["examples_in_html"] == 2


def test_lm_evaluation_harness_runs_a_local_task_offline_on_base_and_merged(exported_home, tmp_path):
    import lm_eval  # noqa: F401  (the harness extra, installed by scripts/setup.sh: missing is an error, not a skip)
    home, run_id = exported_home
    run_cli("merge", run_id, home=home)
    result = cli_json("eval", run_id, "--harness", "--harness-limit", "6", home=home)
    for name in ("base", "tuned"):
        acc = result[name]["appliance_general"]["acc"]
        assert 0 <= acc <= 1 and "acc_stderr" in result[name]["appliance_general"]
    assert json.loads((home / "runs" / run_id / "eval.json").read_text())["harness"]["tasks"] == ["appliance_general"]
    # A task of the user's own, on local JSON.
    items = tmp_path / "qa.jsonl"
    items.write_text("".join(json.dumps({"q": f"Is {i} even?", "choices": ["yes", "no"], "a": i % 2}) + "\n"
                             for i in range(4)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "parity.yaml").write_text(
        f"task: parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    own = cli_json("eval", run_id, "--harness", "parity", "--harness-tasks", str(tasks), home=home)
    assert set(own["tuned"]) == {"parity"}
    unknown = run_cli("eval", run_id, "--harness", "mmlu_nope", home=home, check=False)
    assert unknown.returncode == 2 and "knows no task 'mmlu_nope'" in unknown.stderr
