"""Serve: the OpenAI-compatible endpoint (what `appliance serve` does): start and stop it, its address, the API
keys and tenants, and the requests and tokens each tenant has used, live.

A server runs in its own process and outlives the TUI, as a training run does; the screen finds the running ones
through their state files (``serve/running/<pid>.json``) every two seconds. A new key is shown here once and never
again (only its hash is kept).
"""

from __future__ import annotations

import ipaddress

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.widgets import Button, DataTable, Input, Static

from .base import Pane

HINT = ("enter a model (run id, model id or .gguf) and start · the base and TENANT=RUN pairs serve each tenant "
        "through its adapter · k makes a key · x revokes the selected key · another host needs `serve allow` and a "
        "TLS certificate (c) · l sets a tenant's limits")


def serve_models() -> list[str]:
    """What can be served: the runs with a GGUF, then the imported models."""
    from appliance import models, runs
    from appliance.workspace import folder

    done = [r["id"] for r in runs.list_runs() if any((folder("runs") / r["id"] / "gguf").glob("model-*.gguf"))]
    return done + [m["id"] for m in models.list_models()]


def load() -> dict:
    from appliance import serve
    from appliance.serve import keys

    return {"servers": serve.running(), "keys": keys.listing(), "models": serve_models()}


def fill(table: DataTable, rows: list[tuple]) -> None:
    """Rows (key, cells...) into a table, redrawn only when they changed: the cursor stays where the user put it."""
    if getattr(table, "shown_rows", None) == rows:
        return
    row = table.cursor_row
    table.clear()
    for key, *cells in rows:
        table.add_row(*cells, key=key)
    table.shown_rows = rows
    if rows:
        table.move_cursor(row=min(row or 0, len(rows) - 1))


class ServeScreen(Pane):
    BINDINGS = [Binding("k", "new_key", "new key"), Binding("x", "revoke", "revoke key"),
                Binding("s", "stop", "stop server"), Binding("c", "cert", "TLS certificate"),
                Binding("l", "limits", "tenant limits")]
    DEFAULT_CSS = """
    ServeScreen #serve-form { height: auto; }
    ServeScreen #serve-form Input { width: 1fr; }
    ServeScreen #serve-model { width: 2fr; }
    ServeScreen #serve-adapters { width: 3fr; }
    ServeScreen #serve-status { height: auto; padding: 0 1; }
    ServeScreen #serve-tables { height: 1fr; }
    ServeScreen #serve-tables DataTable { width: 1fr; }
    ServeScreen #key-form { height: auto; }
    ServeScreen #key-form Input { width: 1fr; }
    ServeScreen #key-shown { height: auto; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HINT, id="serve-hint")
        with Horizontal(id="serve-form"):
            yield Input(placeholder="model: run id, model id or .gguf", id="serve-model")
            yield Input(placeholder="host (127.0.0.1)", id="serve-host")
            yield Input("8080", placeholder="port", id="serve-port", type="integer")
            yield Input("4", placeholder="slots", id="serve-parallel", type="integer")
            yield Input(placeholder="adapters: TENANT=RUN, … (optional)", id="serve-adapters")
            yield Button("Start", id="serve-start", variant="primary")
        yield Static("no server is running", id="serve-status")
        with Horizontal(id="serve-tables"):
            servers: DataTable = DataTable(id="servers", cursor_type="row", zebra_stripes=True)
            servers.add_columns("server", "address", "tenant", "requests", "prompt tok", "answer tok", "errors")
            yield servers
            with Vertical():
                table: DataTable = DataTable(id="keys", cursor_type="row", zebra_stripes=True)
                table.add_columns("key", "tenant", "created", "revoked")
                yield table
                with Horizontal(id="key-form"):
                    yield Input(placeholder="tenant (new key, limits)", id="key-tenant")
                    yield Button("New key", id="key-new")
                    yield Input(placeholder="max tokens", id="lim-tokens", type="integer")
                    yield Input(placeholder="concurrent", id="lim-concurrent", type="integer")
                    yield Button("Limits", id="lim-set")
                yield Static("", id="key-shown")

    def on_mount(self) -> None:
        self.state: dict = {"servers": [], "keys": [], "models": []}
        self.starting = None  # the Popen of a server being started from here, until its state file appears
        self.refresh_data()
        self.set_interval(2.0, self.refresh_data)

    def focus_default(self) -> None:
        self.query_one("#serve-model", Input).focus()

    def refresh_data(self) -> None:
        self.call(load, self.show, group="load")

    def show(self, state: dict) -> None:
        self.state = state
        model = self.query_one("#serve-model", Input)
        if not model.value and state["models"]:
            model.value = state["models"][0]
        rows = []
        for s in state["servers"]:
            tenants = s["usage"]["tenants"] or {"-": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                      "errors": 0}}
            rows += [(f"{s['pid']}:{tenant}", f"{s['model']} (pid {s['pid']})", s["url"], tenant, str(c["requests"]),
                      str(c["prompt_tokens"]), str(c["completion_tokens"]), str(c["errors"]))
                     for tenant, c in tenants.items()]
        fill(self.query_one("#servers", DataTable), rows)
        fill(self.query_one("#keys", DataTable),
             [(k["id"], k["id"], k["tenant"], k["created"], k["revoked"] or "-") for k in state["keys"]])
        status = self.query_one("#serve-status", Static)
        if self.starting is not None:
            rc = self.starting.poll()
            if any(int(s["pid"]) == self.starting.pid for s in state["servers"]):
                self.starting = None
            elif rc is not None:
                from appliance import serve

                self.starting = None
                status.update(f"[$error]the server did not start: {escape(serve.launch_error())}[/]")
                return
            else:
                status.update("starting… (llama-server is loading the model)")
                return
        if state["servers"]:
            lines = [f"[$success]serving[/] {escape(s['model'])} at [b]{escape(s['url'])}[/] ({s['engine']}, "
                     f"{s['parallel']} slots, {s['usage']['denied']} refused"
                     + (f", TLS sha256 {s['tls'][:23]}…" if s.get("tls") else "")
                     + (", [$error]no TLS[/]" if s.get("url", "").startswith("http://") and
                        not s.get("host", "127.0.0.1").startswith("127.") and s.get("host") != "::1" else "")
                     + ") · s stops it" for s in state["servers"]]
            status.update("\n".join(lines))
        else:
            status.update("no server is running")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "serve-start":
            self.action_start()
        elif event.button.id == "key-new":
            self.action_new_key()
        elif event.button.id == "lim-set":
            self.action_limits()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "key-tenant":
            self.action_new_key()
        elif event.input.id.startswith("serve-"):
            self.action_start()

    def action_start(self) -> None:
        from appliance import serve
        from appliance.errors import InvalidInput

        model = self.query_one("#serve-model", Input).value.strip()
        if not model:
            raise InvalidInput("name a model to serve: a run id, a model id or a .gguf file.")
        try:
            port = int(self.query_one("#serve-port", Input).value or "8080")
            parallel = int(self.query_one("#serve-parallel", Input).value or "4")
        except ValueError:
            raise InvalidInput("port and slots must be whole numbers.") from None
        pairs = [p.strip() for p in self.query_one("#serve-adapters", Input).value.split(",") if p.strip()]
        host = serve.check_host(self.query_one("#serve-host", Input).value.strip() or "127.0.0.1")
        tls = None
        if not ipaddress.ip_address(host).is_loopback:  # beyond loopback only with TLS (the CLI's --insecure aside)
            from appliance.serve.tls import pair_for

            tls = pair_for(host)
            if tls is None:
                raise InvalidInput(f"serving on {host} needs TLS: press c to make a certificate for it (or give "
                                   "`appliance serve --tls-cert/--tls-key` your own).")
        serve.plan(model, pairs)  # a wrong name or pair is said here, at once, not by a process that exits
        self.starting = serve.launch(model, port=port, parallel=parallel, adapters=pairs, host=host, tls=tls)
        self.query_one("#serve-status", Static).update("starting… (llama-server is loading the model)")

    def action_stop(self) -> None:
        from appliance import serve

        servers = self.state["servers"]
        if not servers:
            return
        table = self.query_one("#servers", DataTable)
        pid = int(servers[0]["pid"])
        if table.row_count and table.cursor_row is not None:
            row_key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
            pid = int(str(row_key).split(":")[0])
        serve.stop(pid)
        self.query_one("#serve-status", Static).update(f"stopping the server (pid {pid})…")

    def action_new_key(self) -> None:
        from appliance.serve import keys

        field = self.query_one("#key-tenant", Input)
        made = keys.create(field.value.strip())
        field.value = ""
        self.query_one("#key-shown", Static).update(
            f"key for [b]{escape(made['tenant'])}[/] (shown once, only its hash is kept):\n{escape(made['key'])}")
        self.refresh_data()

    def action_revoke(self) -> None:
        from appliance.serve import keys

        table = self.query_one("#keys", DataTable)
        if not table.row_count:
            return
        key_id = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        gone = keys.revoke(str(key_id))
        self.query_one("#key-shown", Static).update(f"revoked {', '.join(k['id'] for k in gone)}")
        self.refresh_data()

    def action_cert(self) -> None:
        """A self-signed certificate for the host typed above (`serve cert`): its fingerprint shown for clients."""
        from appliance.errors import InvalidInput
        from appliance.serve.tls import make_pair

        host = self.query_one("#serve-host", Input).value.strip()
        if not host:
            raise InvalidInput("type the host clients will connect to (this machine's address) first.")
        made = make_pair(host)
        self.query_one("#key-shown", Static).update(
            f"TLS certificate for [b]{escape(made['host'])}[/]: {escape(made['cert'])}\nsha256 "
            f"{escape(made['sha256'])}\n(give clients the certificate file to pin)")

    def action_limits(self) -> None:
        """The tenant's own max_tokens and concurrency (`serve limits`); a running server applies them at once."""
        from appliance.errors import InvalidInput
        from appliance.serve import limits

        tenant = self.query_one("#key-tenant", Input).value.strip()
        table = self.query_one("#keys", DataTable)
        if not tenant and table.row_count:
            tenant = str(table.get_row_at(table.cursor_row)[1])
        values = {}
        for field, name in (("#lim-tokens", "max_tokens"), ("#lim-concurrent", "concurrent")):
            text = self.query_one(field, Input).value.strip()
            if text:
                try:
                    values[name] = int(text)
                except ValueError:
                    raise InvalidInput(f"{name.replace('_', ' ')} must be a whole number; got {text!r}.") from None
        if not tenant:
            raise InvalidInput("name the tenant (or select one of its keys) to set its limits.")
        own = limits.set_tenant(tenant, reset=not values, **values)
        self.query_one("#key-shown", Static).update(
            f"limits of [b]{escape(tenant)}[/]: " + (", ".join(f"{k} {v}" for k, v in sorted(own.items())) or
                                                    "the server's defaults"))
