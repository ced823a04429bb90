"""`appliance plan`, `appliance train` and `appliance runs list|show|follow|stop|resume`."""

from __future__ import annotations

import json
import sys

from .common import command, rich_console, parse_overrides, print_json


def parsers(add) -> None:
    pl = add("plan", "will a recipe fit this machine's GPUs (or RAM)? memory per device, adjustments, strategy")
    pl.add_argument("recipe")
    pl.add_argument("--simulate", metavar="PROFILE", help="plan for a named hardware profile (`appliance hw --help`)")
    pl.add_argument("--model-config", help="the base model's config.json, to plan before its weights are here")
    pl.add_argument("--limit", type=float, default=0.9, help="share of each device's memory a plan may use (0.9)")
    pl.add_argument("--allow-shorter", action="store_true", help="allow shorter sequences if nothing else fits")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")

    t = add("train", "start a training run from a recipe; prints the run id")
    t.add_argument("recipe")
    t.add_argument("--allow-shorter", action="store_true",
                   help="let the plan shorten sequences if nothing else makes the run fit")
    t.add_argument("--processes", type=int, metavar="N",
                   help="data-parallel processes (default: the plan's choice; one per GPU when a replica fits one)")
    _topology_flags(t)
    t.add_argument("--detach", action="store_true", help="start the run and return at once")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set training.max_steps=10")

    r = add("runs", "training runs", json_out=False)
    rsub = r.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    for name, help in (("list", "list runs"), ("show", "one run in detail"), ("follow", "follow a run's progress"),
                       ("stop", "stop a running run (it stays resumable)"),
                       ("resume", "continue an interrupted run from its last checkpoint")):
        sp = rsub.add_parser(name, help=help)
        if name != "list":
            sp.add_argument("run")
        if name == "resume":
            sp.add_argument("--detach", action="store_true")
            sp.add_argument("--processes", type=int, metavar="N", help="data-parallel processes (default: as before)")
            _topology_flags(sp, resume=True)
        sp.add_argument("--json", action="store_true")


def _topology_flags(p, resume: bool = False) -> None:
    again = " (default: as before)" if resume else ""
    p.add_argument("--nnodes", type=int, metavar="M", help="machines training together, each running this command"
                   + again)
    p.add_argument("--node-rank", type=int, metavar="R", help="this machine's place, 0 to M-1 (0 hosts the "
                   "rendezvous)" + again)
    p.add_argument("--rdzv", metavar="HOST:PORT", help="node 0's address and port, the same on every machine; a "
                   "declared peer (`appliance cluster allow`)" + again)


def _topology(args) -> dict:
    return {"processes": args.processes, "nnodes": args.nnodes, "node_rank": args.node_rank, "rdzv": args.rdzv}


@command("plan")
def _plan(args) -> int:
    from .. import plan as planner
    from .. import recipes

    recipe = recipes.load(args.recipe, **parse_overrides(args.set))
    plan = planner.plan_recipe(recipe, simulate=args.simulate, model_config=args.model_config, limit=args.limit,
                               allow_shorter=args.allow_shorter)
    if args.json:
        print_json(plan)
    else:
        print(planner.render_text(plan))
    return 0 if plan["verdict"] != "does_not_fit" else 3


@command("train")
def _train(args) -> int:
    from .. import plan as planner
    from .. import recipes, runs
    from ..errors import InvalidInput

    if args.processes is not None and args.processes < 1:
        raise InvalidInput(f"--processes {args.processes}: give 1 or more.")
    if args.nnodes is not None and args.nnodes > 1:  # before the plan and the run: a clear sentence, nothing made
        from ..cluster import Topology

        from ..cluster import require_secret
        from .common import unlocked

        Topology(args.processes or 1, args.nnodes, args.node_rank or 0, args.rdzv).check()
        require_secret(unlocked())
    recipe = recipes.load(args.recipe, **parse_overrides(args.set))
    # Plan first: refuse what cannot fit, apply the safe adjustments (the effective batch is kept).
    recipe, plan = planner.fitted(recipe, allow_shorter=args.allow_shorter)
    if not args.json:
        from ..duration import text

        for c in plan["checks"]:
            print(f"warning: {c['message']}", file=sys.stderr)
        if plan["duration"]["seconds"] is not None:
            print(f"estimated time: {text(plan['duration']['seconds'])} ({plan['duration']['basis']})")
        if plan["choices"]:
            print("the plan chose: " + "; ".join(c["change"] for c in plan["choices"]))
        if plan["adjustments"]:
            print("the plan adjusted the recipe to fit: " + "; ".join(a["change"] for a in plan["adjustments"]))
    run_id = runs.create(recipe, plan)
    runs.start(run_id, **_topology(args))
    return after_start(run_id, args.detach, args.json)


def after_start(run_id: str, detach: bool, json_mode: bool) -> int:
    if detach:
        print_json({"run": run_id, "state": "running"}) if json_mode else print(run_id)
        return 0
    if not json_mode:
        print(f"run {run_id}")
    return follow(run_id, json_mode)


def follow(run_id: str, json_mode: bool) -> int:
    from .. import runs
    from ..render import follow_training

    follow_training(runs.follow(run_id), quiet=json_mode)
    st = runs.status(run_id)
    if json_mode:
        print_json(st)
    elif st["state"] == "finished":
        s = st["summary"] or {}
        print(f"finished: {s.get('steps')} steps, final loss {s.get('final_loss')}, adapter in {st['path']}/adapter")
    elif st["state"] == "failed":
        print(f"error: run {run_id} failed: {st['error']}", file=sys.stderr)
    elif st["state"] == "interrupted":
        print(f"run {run_id} stopped at step {st['step']}; `appliance runs resume {run_id}` continues "
              f"from {st['last_checkpoint'] or 'the start'}", file=sys.stderr)
    return {"finished": 0, "running": 0}.get(st["state"], 4)


@command("runs list")
def _runs_list(args) -> int:
    from .. import runs

    rs = runs.list_runs()
    if args.json:
        print_json({"runs": rs})
        return 0
    from rich.table import Table

    table = Table("state", "step", "loss", "base model")
    table.add_column("id", no_wrap=True)
    for r in rs:
        step = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        table.add_row(r["state"], step, loss, r["base_model"], r["id"])
    rich_console().print(table if rs else "no runs yet: `appliance train RECIPE`")
    return 0


@command("runs show")
def _runs_show(args) -> int:
    from .. import runs

    st = runs.status(args.run)
    st.update({name: report for name, report in runs.reports(args.run).items() if report is not None})
    if args.json:
        print_json(st)
        return 0
    for key in ("id", "state", "recipe", "base_model", "dataset", "step", "max_steps", "loss", "last_checkpoint",
                "error", "path"):
        if st.get(key) is not None:
            print(f"{key:>16}: {st[key]}")
    for key in ("summary", "merge", "export", "eval"):
        if st.get(key):
            print(f"{key:>16}: {json.dumps(st[key], sort_keys=True)}")
    return 0


@command("runs follow")
def _runs_follow(args) -> int:
    return follow(args.run, args.json)


@command("runs stop")
def _runs_stop(args) -> int:
    from .. import runs

    stopped = runs.stop(args.run)
    print_json({"run": args.run, "stopped": stopped}) if args.json else print(
        f"stopping {args.run}" if stopped else f"run {args.run} is not running")
    return 0


@command("runs resume")
def _runs_resume(args) -> int:
    from .. import runs

    runs.resume(args.run, **_topology(args))
    return after_start(args.run, args.detach, args.json)
