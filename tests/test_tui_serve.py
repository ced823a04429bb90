"""The Serve screen, driven with Pilot: a key made and shown once, a real server started for the exported run, a
request from the official OpenAI client counted live, the server stopped, the key revoked."""

from __future__ import annotations

from textual.widgets import DataTable, Static

from tests.test_tui import SIZE, aio
from tests.test_tui_screens import type_into
from tests.test_tui_train import open_screen, put, wait_for
from tui.app import ApplianceApp

import openai  # noqa: E402  (pinned in the test extra: missing is an error, not a skip)


def status(app) -> str:
    return str(app.query_one("#serve-status", Static).render())


@aio
async def test_serve_screen_makes_a_key_starts_counts_and_stops(exported_home):
    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "w")
        await wait_for(pilot, lambda: app.query_one("#serve-model").value == run_id, "the run offered as the model")
        assert "no server is running" in status(app)

        await type_into(pilot, "#key-tenant", "acme")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "apk-acme-" in str(app.query_one("#key-shown", Static).render()), "the new key")
        key = str(app.query_one("#key-shown", Static).render()).split()[-1]
        assert key.startswith("apk-acme-") and key not in (home / "serve" / "keys.json").read_text()
        keys = app.query_one("#keys", DataTable)
        await wait_for(pilot, lambda: keys.row_count == 1, "the key listed")
        assert keys.get_row_at(0)[1] == "acme"

        await put(pilot, "#serve-port", "0")
        await put(pilot, "#serve-parallel", "1")
        app.query_one("#serve-start").press()
        await wait_for(pilot, lambda: "serving" in status(app), "the server to start", timeout=180)
        url = status(app).split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")

        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens == 3
        servers = app.query_one("#servers", DataTable)
        await wait_for(pilot, lambda: servers.row_count == 1 and servers.get_row_at(0)[2:5] == ["acme", "1", str(
            answer.usage.prompt_tokens)], "the live count")

        app.query_one("#servers", DataTable).focus()
        await pilot.press("s")
        await wait_for(pilot, lambda: "no server is running" in status(app), "the server to stop", timeout=60)

        keys.focus()
        await pilot.press("x")
        await wait_for(pilot, lambda: keys.row_count == 1 and keys.get_row_at(0)[3] != "-", "the key revoked")
    from appliance.trust import audit

    assert [e["details"]["tenant"] for e in audit.entries(event="serve.usage")] == ["acme"]


@aio
async def test_export_screen_writes_the_adapter_gguf_the_serve_screen_needs(exported_home):
    from textual.widgets import Label

    from tests.test_tui_eval_export import open_screen as open_settled, until

    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_settled(pilot, "8")
        app.query_one("#ex-runs", DataTable).focus()
        await pilot.press("a")
        await until(pilot, lambda: "adapter GGUF of" in str(app.query_one("#ex-stage", Label).render()))
        stage = str(app.query_one("#ex-stage", Label).render())
        assert f"adapter GGUF of {run_id}" in stage and "serve it on tiny" in stage
    assert (home / "runs" / run_id / "adapter-gguf" / "adapter-f16.gguf").is_file()


@aio
async def test_serve_screen_sets_a_tenants_limits_and_makes_a_tls_certificate(exported_home):
    """What `serve limits` and `serve cert` do, from the Serve screen; another host than loopback is refused
    until the operator declared it, and without a certificate."""
    from tests.test_tui_screens import error_message

    home, run_id = exported_home
    app = ApplianceApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "w")
        await put(pilot, "#key-tenant", "acme")
        await put(pilot, "#lim-tokens", "64")
        await put(pilot, "#lim-concurrent", "2")
        app.query_one("#lim-set").press()
        await wait_for(pilot, lambda: "limits of acme" in str(app.query_one("#key-shown", Static).render()),
                       "the limits set")
        assert "concurrent 2, max_tokens 64" in str(app.query_one("#key-shown", Static).render())

        await put(pilot, "#serve-host", "127.0.0.1")
        app.query_one("#serve-host").focus()
        app.query_one("ServeScreen").action_cert()
        await pilot.pause()
        shown = str(app.query_one("#key-shown", Static).render())
        assert "TLS certificate for 127.0.0.1" in shown and "sha256" in shown

        await put(pilot, "#serve-host", "0.0.0.0")
        app.query_one("#serve-start").press()
        await pilot.pause()
        assert "is the wildcard address" in error_message(app)
    from appliance.serve import limits
    from appliance.trust import audit

    assert limits.tenant_overrides() == {"acme": {"concurrent": 2, "max_tokens": 64}}
    assert audit.entries(event="serve.limits")[-1]["details"]["tenant"] == "acme"
    assert (home / "serve" / "tls" / "serve-127.0.0.1.crt").is_file()
