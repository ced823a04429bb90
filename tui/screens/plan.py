"""Plan: a recipe's memory plan on this machine or a named profile, drawn as bars per device against the
device's limit; and Train, which starts the run exactly as `appliance train` does and follows it.

The form under the recipe overrides its base model, dataset and knobs, as `--set KEY=VALUE` does on the command
line: an empty field keeps the recipe's value (shown as the field's placeholder)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Collapsible, Input, Label, Select, Static

from appliance.plan import footprint_lines, method_text

from .base import Pane, require_unlocked

GiB = 2**30
BAR = 40
DEFAULT_RECIPE = "recipes/demo-cpu.yaml"
VERDICTS = {"fits": ("fits", "green"), "fits_after_adjustment": ("fits after adjustment", "yellow"),
            "does_not_fit": ("does not fit", "bold red")}


def bars(plan: dict) -> Text:
    """Each device: its parts as horizontal bars on one scale with the device's limit (a | marks it)."""
    out = Text()
    for d in plan["devices"]:
        scale = max(d["estimate"], d["limit"]) or 1
        ok = d["fits"]
        out.append(f"{d['device']}", style="bold")
        out.append(f"  {d['estimate'] / GiB:.2f} GiB of {d['limit'] / GiB:.2f} GiB allowed "
                   f"({d['capacity'] / GiB:.1f} GiB total) ")
        out.append("ok\n" if ok else "TOO MUCH\n", style="green" if ok else "bold red")
        limit_at = round(BAR * d["limit"] / scale)
        start = 0.0
        for part, value in d["breakdown"].items():
            # Stacked: each part starts where the one before ended, so the last one ends at the total.
            a, b = round(BAR * start / scale), round(BAR * (start + value) / scale)
            start += value
            row = Text(f"  {part:<16}{value / GiB:>7.2f} GiB ")
            for i in range(BAR + 1):
                if i == limit_at:
                    row.append("|", style="bold")
                elif a <= i < b:
                    row.append("█", style="red" if i >= limit_at else "cyan")
                else:
                    row.append("·", style="dim")
            out.append_text(row)
            out.append("\n")
        total_at = round(BAR * d["estimate"] / scale)
        out.append(f"  {'total':<16}{d['estimate'] / GiB:>7.2f} GiB ")
        out.append("█" * min(total_at, limit_at), style="green" if ok else "cyan")
        out.append("█" * max(0, total_at - limit_at), style="red")
        out.append(" " * max(0, limit_at - total_at))
        out.append("|", style="bold")
        out.append(" limit\n\n")
    return out


def summary(plan: dict) -> str:
    m, k = plan["model"], plan["knobs"]
    word, style = VERDICTS[plan["verdict"]]
    lines = [f"[{style}]{word.upper()}[/] on {escape(str(plan['hardware']))} "
             f"(limit {plan['limit_fraction']:.0%} of each device)",
             f"{escape(m['name'])}: {m['parameters'] / 1e9:.2f}B parameters, {m['layers']} layers · {k['quant']}, "
             f"{method_text(k)}, micro-batch {k['micro_batch']} x {k['grad_accum']}, sequences {k['seq_len']}, "
             f"checkpointing {'on' if k['grad_ckpt'] else 'off'}, {k['optimizer']}"
             f"{', packed' if k.get('packing') else ''}"]
    if plan.get("duration"):
        from appliance.duration import text

        lines.append(f"time: {text(plan['duration']['seconds'])} [dim](an estimate)[/]")
    if plan.get("config"):
        lines.append(f"[dim]model shape from {escape(str(plan['config']))}[/]")
    return "\n".join(lines)


def details(plan: dict) -> str:
    lines = []
    if plan.get("choices"):
        lines.append("[b]chosen by the plan (the recipe left them to it):[/]")
        lines += [f"  - {escape(c['change'])} ({escape(c['why'])})" for c in plan["choices"]]
    if plan["adjustments"]:
        lines.append("[b]adjustments, in order:[/]")
        lines += [f"  - {escape(a['change'])} ({escape(a['why'])})" for a in plan["adjustments"]]
    lines.append(f"[b]strategy:[/] {escape(plan['strategy']['mode'])}: {escape(plan['strategy']['why'])}")
    if plan.get("would_fit"):
        lines.append("[b]what would fit:[/]")
        lines += [f"  - {escape(w)}" for w in plan["would_fit"]]
    if plan.get("duration"):
        lines.append(f"[b]time:[/] {escape(plan['duration']['basis'])}")
    if plan.get("footprint"):
        for line in footprint_lines(plan["footprint"]):
            what, rest = line.split(": ", 1)
            lines.append(f"[b]{escape(what)}:[/] {escape(rest)}")
    if plan.get("checks"):
        lines.append("[b]checks from the guides:[/]")
        lines += [f"  [$warning]warning:[/] {escape(c['message'])}" for c in plan["checks"]]
    return "\n".join(lines)


def int_or_auto(raw: str):
    return "auto" if raw.lower() == "auto" else int(raw)


# The knobs the form edits: (input id, recipe key, label, type).
KNOBS = (
    ("k-steps", "training.max_steps", "steps", int),
    ("k-batch", "training.micro_batch_size", "micro-batch", int_or_auto),
    ("k-accum", "training.gradient_accumulation_steps", "accumulate", int),
    ("k-seq", "training.max_seq_length", "seq length", int),
    ("k-rank", "lora.r", "LoRA rank", int),
    ("k-lr", "training.learning_rate", "learning rate", float),
    ("k-keep", "training.keep_checkpoints", "keep ckpts", int),
)
RECIPES = "(the recipe's)"
STRATEGIES = ("auto", "ddp", "fsdp", "split")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # quantization.compute_dtype


def recipe_defaults(path: str) -> dict:
    """The recipe's own values of the fields the form can override (shown as their placeholders)."""
    from appliance import recipes

    r = recipes.load(path)
    mix = r.dataset if isinstance(r.dataset, str) else " + ".join(f"{s.id} {s.weight:g}" for s in r.dataset)
    steps = r.training.max_steps or f"{r.training.num_epochs:g} epochs"
    return {"base_model": r.base_model, "dataset": mix, "training.max_steps": steps,
            "training.micro_batch_size": r.training.micro_batch_size,
            "training.gradient_accumulation_steps": r.training.gradient_accumulation_steps,
            "training.max_seq_length": r.training.max_seq_length, "lora.r": r.lora.r if r.lora else "full",
            "training.learning_rate": r.training.learning_rate,
            "training.gradient_checkpointing": r.training.gradient_checkpointing,
            "training.packing": r.training.packing, "training.strategy": r.training.strategy,
            "training.fsdp_cpu_offload": r.training.fsdp_cpu_offload,
            "training.keep_checkpoints": r.training.keep_checkpoints or "all",
            "quantization.compute_dtype": r.quantization.compute_dtype}


def choices() -> tuple[list[str], list[str]]:
    """Imported model ids, and dataset ids in the vault (read without the passphrase)."""
    from appliance import models
    from appliance.trust import keyring

    return ([m["id"] for m in models.list_models()],
            keyring.status()["datasets"] if keyring.exists() else [])


def start_training(recipe_path: str, overrides: dict | None = None, allow_shorter: bool = False,
                   processes: int | None = None, nodes: dict | None = None) -> str:
    """What `appliance train RECIPE` does: plan on this machine, refuse what cannot fit, apply the safe
    adjustments, create the run and start its worker. Returns the run's id."""
    from appliance import plan as planner
    from appliance import recipes, runs

    recipe = recipes.load(recipe_path, **(overrides or {}))
    require_unlocked()  # the run's dataset key and the signing key go to the worker
    recipe, plan = planner.fitted(recipe, allow_shorter=allow_shorter)
    run_id = runs.create(recipe, plan)
    runs.start(run_id, processes=processes, **(nodes or {}))
    return run_id


def parse_nodes(text: str) -> dict | None:
    """The "machines" field: ``R/M@HOST:PORT`` (this machine is node R of M, meeting at node 0's HOST:PORT), as
    `train --node-rank R --nnodes M --rdzv HOST:PORT`; empty: this machine alone."""
    from appliance.cluster import Topology
    from appliance.errors import InvalidInput

    text = text.strip()
    if not text:
        return None
    ranks, at, rdzv = text.partition("@")
    rank, slash, total = ranks.partition("/")
    if not (at and slash and rank.strip().isdigit() and total.strip().isdigit()):
        raise InvalidInput(f"Plan: machines {text!r} is not R/M@HOST:PORT (e.g. 1/2@10.0.0.1:29400: this machine is "
                           "node 1 of 2, node 0 at 10.0.0.1:29400); clear the field to train on this machine alone.")
    nodes = {"nnodes": int(total), "node_rank": int(rank), "rdzv": rdzv.strip()}
    Topology(1, nodes["nnodes"], nodes["node_rank"], nodes["rdzv"]).check()
    return nodes


class PlanScreen(Pane):
    BINDINGS = [Binding("p", "plan", "plan"), Binding("t", "train", "train"),
                Binding("k", "knobs", "knobs", tooltip="base model, dataset and knobs that override the recipe")]
    DEFAULT_CSS = """
    PlanScreen #plan-form { height: auto; }
    PlanScreen #recipe { width: 2fr; }
    PlanScreen #profile { width: 24; }
    PlanScreen #plan-form Button { min-width: 9; width: auto; }
    PlanScreen #knobs { height: auto; padding: 0; margin: 0; }
    PlanScreen #knobs Contents { padding: 0 0 0 1; }
    PlanScreen #knobs Horizontal { height: auto; }
    PlanScreen #knobs Select { width: 1fr; }
    PlanScreen #k-ckpt, PlanScreen #k-packing, PlanScreen #k-offload { width: auto; }
    PlanScreen #k-shorter { width: auto; margin: 1 0 0 0; }
    PlanScreen #k-model { width: 3fr; }
    PlanScreen #k-config-box { width: 2fr; }
    PlanScreen .knob { width: 1fr; height: auto; }
    PlanScreen .knob Label { padding: 0 1; color: $text-muted; }
    PlanScreen .knob Input { width: 100%; }
    PlanScreen #plan-view { height: 1fr; border-top: solid $accent; padding: 0 1; }
    PlanScreen #plan-summary, PlanScreen #plan-bars, PlanScreen #plan-details { height: auto; }
    """

    def __init__(self, simulate: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.simulate = simulate
        self.plan: dict | None = None

    def compose(self) -> ComposeResult:
        from appliance.hardware import PROFILES

        with Horizontal(id="plan-form"):
            yield Input(DEFAULT_RECIPE if Path(DEFAULT_RECIPE).is_file() else "", placeholder="recipe file (YAML)",
                        id="recipe")
            options = [("this machine", "")] + [(name, name) for name in PROFILES]
            yield Select(options, value=self.simulate or "", allow_blank=False, id="profile")
            yield Button("Plan", id="plan-go", variant="primary")
            yield Button("Train", id="train-go", variant="success")
        with Collapsible(title="base model, dataset and knobs (override the recipe)", id="knobs", collapsed=True):
            with Horizontal():
                yield Select([], prompt=f"model {RECIPES}", id="k-model")
                yield Select([], prompt=f"dataset {RECIPES}", id="k-dataset")
                yield Checkbox("grad ckpt", id="k-ckpt")
                yield Checkbox("packing", True, id="k-packing",
                               tooltip="examples packed into bins of max_seq_length, attention kept inside each")
                yield Select([(f"strategy {s}", s) for s in STRATEGIES], prompt=f"strategy {RECIPES}",
                             id="k-strategy", tooltip="how several processes or GPUs share the work "
                             "(`training.strategy`): auto is the plan's choice (DDP, else FSDP, else a split)")
                yield Select([(f"compute {d}", d) for d in DTYPES], prompt=f"compute {RECIPES}", id="k-dtype",
                             tooltip="the compute dtype: auto takes what this hardware computes natively (bfloat16 "
                                     "with AVX512-BF16/AMX or on GPUs of cc 8.0+, float32 on other CPUs)")
                yield Checkbox("CPU offload", id="k-offload",
                               tooltip="FSDP keeps its shards in host memory (`training.fsdp_cpu_offload`)")
            with Horizontal(id="k-run"):
                with Vertical(classes="knob"):
                    yield Label("memory share")
                    yield Input(placeholder="0.9", id="k-limit",
                                tooltip="the share of each device's memory a plan may use (`--limit`)")
                with Vertical(classes="knob"):
                    yield Label("processes")
                    yield Input(placeholder="plan's", id="k-procs", type="integer",
                                tooltip="training processes, one per GPU (`--processes`); empty: the plan's choice")
                with Vertical(classes="knob"):
                    yield Label("machines")
                    yield Input(placeholder="this one", id="k-nodes",
                                tooltip="train across machines: R/M@HOST:PORT, this machine is node R of M, node 0 "
                                        "listens at HOST:PORT (`--node-rank R --nnodes M --rdzv HOST:PORT`); every "
                                        "machine declared first (`appliance cluster allow`)")
                with Vertical(classes="knob", id="k-config-box"):
                    yield Label("model config.json")
                    yield Input(placeholder="the model's own", id="k-config",
                                tooltip="plan only: a model whose weights are not here yet, from its config.json "
                                        "(`plan --model-config`)")
                yield Checkbox("allow shorter seqs", id="k-shorter",
                               tooltip="let the plan shorten sequences if nothing else fits (`--allow-shorter`)")
            with Horizontal():
                for input_id, _, label, kind in KNOBS:
                    with Vertical(classes="knob"):
                        yield Label(label)
                        yield Input(id=input_id, type="integer" if kind is int else "text")
        with VerticalScroll(id="plan-view"):
            yield Static("p plans the recipe on the chosen hardware; t trains it on this machine "
                         "(`appliance train`)", id="plan-summary")
            yield Static("", id="plan-bars")
            yield Static("", id="plan-details")

    def on_mount(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        self.call(choices, self.show_choices, group="choices")
        self.load_defaults()

    def show_choices(self, found: tuple[list[str], list[str]]) -> None:
        self.found = found
        self.update_selects()

    def update_selects(self) -> None:
        """The model and dataset choices, each prompt naming the recipe's own (what no choice keeps)."""
        defaults = getattr(self, "defaults", {})
        for select_id, what, ids in zip(("#k-model", "#k-dataset"), ("base_model", "dataset"),
                                        getattr(self, "found", ([], []))):
            select = self.query_one(select_id, Select)
            keep = select.value
            select.prompt = str(defaults.get(what, f"{what.replace('base_', '')} {RECIPES}"))
            select.set_options([(i, i) for i in ids])
            if keep in ids:
                select.value = keep

    def load_defaults(self) -> None:
        path = self.query_one("#recipe", Input).value.strip()
        if not path or not Path(path).is_file():
            return

        def job() -> dict | str:
            from appliance.errors import ApplianceError

            try:
                return recipe_defaults(path)
            except ApplianceError as e:  # said where the plan goes, not in a dialog: the user may be typing
                return str(e)

        def shown(defaults: dict | str) -> None:
            if isinstance(defaults, str):
                self.query_one("#plan-summary", Static).update(escape(defaults))
                return
            self.defaults = defaults
            for input_id, key, _, _ in KNOBS:
                self.query_one(f"#{input_id}", Input).placeholder = str(defaults[key])
            self.update_selects()
            self.query_one("#k-ckpt", Checkbox).value = defaults["training.gradient_checkpointing"] is True
            self.query_one("#k-packing", Checkbox).value = defaults["training.packing"]
            self.query_one("#k-offload", Checkbox).value = defaults["training.fsdp_cpu_offload"]
            self.query_one("#k-strategy", Select).prompt = f"strategy {defaults['training.strategy']}"
            self.query_one("#k-dtype", Select).prompt = f"compute {defaults['quantization.compute_dtype']}"

        self.call(job, shown, group="defaults")

    def overrides(self) -> dict:
        """The form's fields that differ from the recipe, as `--set` pairs; a bad number names its field."""
        from appliance.errors import InvalidInput

        out: dict = {}
        for select_id, key in (("#k-model", "base_model"), ("#k-dataset", "dataset")):
            value = self.query_one(select_id, Select).value
            if value is not Select.NULL and value:
                out[key] = str(value)
        for input_id, key, label, kind in KNOBS:
            raw = self.query_one(f"#{input_id}", Input).value.strip()
            if not raw:
                continue
            try:
                out[key] = kind(raw)
            except ValueError:
                what = {int: "a whole number", int_or_auto: "a whole number or auto"}.get(kind, "a number")
                raise InvalidInput(f"Plan: {label} must be {what}, not "
                                   f"{raw!r}; fix the field or clear it to keep the recipe's value.") from None
        ckpt = self.query_one("#k-ckpt", Checkbox).value
        recipes_ckpt = getattr(self, "defaults", {}).get("training.gradient_checkpointing", False)
        if ckpt != (recipes_ckpt is True):  # toggled: on, or off (an unticked box keeps a recipe's auto)
            out["training.gradient_checkpointing"] = ckpt
        defaults = getattr(self, "defaults", {})
        packing = self.query_one("#k-packing", Checkbox).value
        if packing != defaults.get("training.packing", True):
            out["training.packing"] = packing
        strategy = self.query_one("#k-strategy", Select).value
        if strategy is not Select.NULL and strategy != defaults.get("training.strategy", "auto"):
            out["training.strategy"] = strategy
        dtype = self.query_one("#k-dtype", Select).value
        if dtype is not Select.NULL and dtype != defaults.get("quantization.compute_dtype", "auto"):
            out["quantization.compute_dtype"] = dtype
        offload = self.query_one("#k-offload", Checkbox).value
        if offload != defaults.get("training.fsdp_cpu_offload", False):
            out["training.fsdp_cpu_offload"] = offload
        return out

    def options(self) -> dict:
        """How to plan and start, beside the recipe: `--limit`, `--processes`, `--allow-shorter`, and (planning
        only) `--model-config`."""
        from appliance.errors import InvalidInput

        limit_raw = self.query_one("#k-limit", Input).value.strip()
        procs_raw = self.query_one("#k-procs", Input).value.strip()
        try:
            limit = float(limit_raw) if limit_raw else 0.9
        except ValueError:
            limit = -1.0
        if not 0.1 <= limit <= 1.0:
            raise InvalidInput(f"Plan: memory limit must be a share of each device's memory from 0.1 to 1.0, not "
                               f"{limit_raw!r}; clear the field for 0.9.")
        processes = None
        if procs_raw:
            if not procs_raw.isdigit() or int(procs_raw) < 1:
                raise InvalidInput(f"Plan: processes must be 1 or more, not {procs_raw!r}; clear the field to let the "
                                   "plan choose (one per GPU when a replica fits one).")
            processes = int(procs_raw)
        return {"limit": limit, "processes": processes, "allow_shorter": self.query_one("#k-shorter", Checkbox).value,
                "nodes": parse_nodes(self.query_one("#k-nodes", Input).value),
                "model_config": self.query_one("#k-config", Input).value.strip() or None}

    def focus_default(self) -> None:
        self.query_one("#plan-view").focus()

    def action_knobs(self) -> None:
        knobs = self.query_one("#knobs", Collapsible)
        knobs.collapsed = not knobs.collapsed
        if knobs.collapsed:
            self.focus_default()
        else:
            self.query_one("#k-model", Select).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "recipe" and Path(event.value.strip()).is_file():
            self.load_defaults()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "recipe":
            self.action_plan()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "plan-go":
            self.action_plan()
        elif event.button.id == "train-go":
            self.action_train()

    def action_plan(self) -> None:
        path = self.query_one("#recipe", Input).value.strip()
        profile = str(self.query_one("#profile", Select).value or "") or None
        overrides, options = self.overrides(), self.options()

        def job():
            from appliance import plan as planner
            from appliance import recipes

            config = options["model_config"]
            return planner.plan_recipe(recipes.load(path, **overrides), simulate=profile, limit=options["limit"],
                                       allow_shorter=options["allow_shorter"],
                                       model_config=Path(config).expanduser() if config else None)

        self.query_one("#plan-summary", Static).update(f"planning {escape(path)}…")
        self.call(job, self.show_plan, group="plan")

    def show_plan(self, plan: dict) -> None:
        self.plan = plan
        self.query_one("#plan-summary", Static).update(summary(plan))
        self.query_one("#plan-bars", Static).update(bars(plan))
        self.query_one("#plan-details", Static).update(details(plan))

    def action_train(self) -> None:
        path = self.query_one("#recipe", Input).value.strip()
        overrides, options = self.overrides(), self.options()
        self.query_one("#plan-summary", Static).update(f"planning {escape(path)} on this machine, then starting "
                                                       "the run…")
        self.call(lambda: start_training(path, overrides, allow_shorter=options["allow_shorter"],
                                         processes=options["processes"], nodes=options["nodes"]), self.started,
                  group="train")

    async def started(self, run_id: str) -> None:
        from .train import TrainScreen

        self.query_one("#plan-summary", Static).update(f"started {escape(run_id)}")
        await self.app.action_show("train")
        screen = self.app.query_one(TrainScreen)
        screen.follow(run_id)
        screen.refresh_data()
