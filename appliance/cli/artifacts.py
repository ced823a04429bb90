"""`appliance merge`, `appliance export` and `appliance eval`: what a run becomes."""

from __future__ import annotations

from .common import command, rich_console, print_json


def parsers(add) -> None:
    g = add("merge", "merge a run's adapter into its 16-bit base model")
    g.add_argument("run")
    checkpoint_flag(g)

    x = add("export", "export a run's merged model to GGUF and check it against the merged model")
    x.add_argument("run")
    checkpoint_flag(x)
    x.add_argument("--quant", default=None, help="comma-separated: f16,q8_0,q4_k_m (default: the recipe's)")
    x.add_argument("--adapter", action="store_true",
                   help="write the LoRA adapter as a GGUF adapter instead (for `serve BASE --adapter TENANT=RUN`), "
                        "checked against the merged model")

    e = add("eval", "score base vs tuned on the test split, with confidence intervals")
    e.add_argument("run")
    e.add_argument("--samples", type=int, default=48, help="test examples to answer (default 48)")
    e.add_argument("--judge", metavar="MODEL",
                   help="a local judge (model id, run id or .gguf) compares the answers pairwise, in both orders")
    e.add_argument("--general", type=int, default=240, metavar="N",
                   help="items of the forgetting check (BIG-Bench Hard, default all 240; 0 skips it)")
    e.add_argument("--examples", type=int, default=0, metavar="N",
                   help="write N test examples side by side into eval.html (dataset text in plaintext; audited)")
    e.add_argument("--harness", nargs="?", const="appliance_general", metavar="TASKS",
                   help="lm-evaluation-harness on base and merged model instead (comma-separated tasks; default "
                        "appliance_general); the optional extra, offline, local JSON tasks only")
    e.add_argument("--harness-tasks", metavar="DIR", help="a folder of your own harness task YAMLs (local data files)")
    e.add_argument("--harness-limit", type=int, metavar="N", help="at most N items a task")
    e.add_argument("--review", action="store_true",
                   help="review the last evaluation's answers yourself, blind (A/B in random order)")
    e.add_argument("--reviewer", help="who reviews (default: your login name); recorded in the audit log")
    e.add_argument("--limit", type=int, help="review at most this many items")


def checkpoint_flag(parser) -> None:
    parser.add_argument("--checkpoint", default="best", metavar="best|last|STEP",
                        help="which adapter: best (lowest validation loss, the default), last, or a step's checkpoint")


@command("merge")
def _merge(args) -> int:
    from ..merge import merge
    from ..render import reporter

    result = merge(args.run, emit=reporter(args.json), checkpoint=args.checkpoint)
    if args.json:
        print_json(result)
    else:
        logits = (f"max |logit difference| vs base+adapter {result['max_abs_logit_diff']:.2e}; "
                  if result["max_abs_logit_diff"] is not None else f"{result['logit_check']}; ")
        print(f"merged {result['label']} into {result['path']} ({logits}{result['weights_checked']} merged weights "
              f"checked, the worst at {result['max_weight_excess']:.2f} of its rounding bound)")
    return 0


@command("export")
def _export(args) -> int:
    from ..export import export
    from ..render import reporter

    if args.adapter:
        from ..errors import InvalidInput
        from ..export import export_adapter

        if args.quant:
            raise InvalidInput("--adapter writes the adapter in f16; --quant applies to the merged model's files.")
        done = export_adapter(args.run, emit=reporter(args.json), checkpoint=args.checkpoint)
        if args.json:
            print_json(done)
        else:
            print(f"adapter of {done['label']} written to {done['path']} ({done['bytes'] / 2**20:.1f} MiB); with "
                  f"{done['base_model']} it agrees with the merged model on the top-1 token at "
                  f"{done['top1_agreement']:.2%} of {done['positions']} positions")
        return 0
    quants = [q.strip() for q in args.quant.split(",")] if args.quant else None
    result = export(args.run, quants, emit=reporter(args.json), checkpoint=args.checkpoint)
    if args.json:
        print_json(result)
        return 0
    from ..render import quant_table

    print(f"exported {result['label']}")
    for q, f in result["files"].items():
        print(f"{q:>8}: {f['path']} ({f['bytes'] / 2**20:.1f} MiB)")
    p = result["parity"]
    print(f"  checks: template tokens identical on {p['template_conversations']} conversations; "
          f"stops at {p['eot_token']!r}; top-1 agreement {p['top1_agreement']:.2%} over {p['positions']} positions")
    rich_console().print(quant_table(result["quality"]))
    return 0


@command("eval")
def _eval(args) -> int:
    from ..errors import InvalidInput
    from ..evaluate import evaluate
    from ..render import eval_table, reporter

    if args.samples < 1:
        raise InvalidInput(f"--samples {args.samples} must be at least 1.")
    if args.harness:
        return _harness(args)
    if args.review:
        if args.judge:
            raise InvalidInput("--review and --judge are separate steps: evaluate (with --judge) first, then review.")
        return _review(args)
    if args.general < 0:
        raise InvalidInput(f"--general {args.general} must be 0 (no forgetting check) or more.")
    if args.examples < 0:
        raise InvalidInput(f"--examples {args.examples} must be 0 or more.")
    report = evaluate(args.run, samples=args.samples, judge=args.judge, general=args.general,
                      examples=args.examples, emit=reporter(args.json))
    if args.json:
        print_json(report)
    else:
        from ..render import forgetting_table, judge_table

        rich_console().print(eval_table(report))
        if report.get("forgetting"):
            rich_console().print(forgetting_table(report["forgetting"]))
        if report.get("judge"):
            rich_console().print(judge_table(report["judge"]))
        print(f"the report to read: {report['html']} (opens offline in any browser)")
        print(f"review the answers yourself, blind: appliance eval {args.run} --review")
    return 0


def _harness(args) -> int:
    from pathlib import Path

    from ..errors import InvalidInput
    from ..evaluate import harness
    from ..render import reporter

    if args.harness_limit is not None and args.harness_limit < 1:
        raise InvalidInput(f"--harness-limit {args.harness_limit} must be at least 1.")
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    result = harness.run(args.run, tasks, Path(args.harness_tasks).expanduser() if args.harness_tasks else None,
                         args.harness_limit, emit=reporter(args.json))
    harness.save(args.run, result)
    if args.json:
        print_json(result)
        return 0
    from rich.table import Table

    table = Table(title=f"lm-evaluation-harness on run {args.run}", title_justify="left")
    for name in ("task", "metric", "base", "tuned", "stderr"):
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    from ..evaluate.names import harness_rows

    for task, metric, b, t, se in harness_rows(result):
        table.add_row(task, metric, f"{b:.3f}", "-" if t is None else f"{t:.3f}", "" if se is None else f"±{se:.3f}")
    rich_console().print(table)
    return 0


def _ask(prompt: str, json_mode: bool) -> str:
    """A line from stdin; with --json the question goes to stderr, so stdout holds only the tally."""
    import sys

    if not json_mode:
        return input(prompt)
    print(prompt, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def _review(args) -> int:
    """The blind A/B review at the terminal: a prompt, its reference, answers A and B; a, b, t(ie), s(kip), q(uit)."""
    import getpass

    from rich.markup import escape

    from ..errors import InvalidInput
    from ..evaluate.review import Review

    if args.limit is not None and args.limit < 1:
        raise InvalidInput(f"--limit {args.limit} must be at least 1.")
    session = Review(args.run, args.reviewer or getpass.getuser(), limit=args.limit)
    console = rich_console()
    keys = {"a": "a", "b": "b", "t": "tie", "s": "skip"}
    if not args.json:
        console.print(f"blind review of run {escape(args.run)}: {len(session.items)} items ({session.identical} "
                      "identical answers count as ties); a or b: that answer is better, t: a tie, s: skip, q: stop")
    while (item := session.current()) is not None:
        if not args.json:
            console.rule(f"{item['number']}/{item['total']}")
            for turn in item["prompt"]:
                console.print(f"[bold]{turn['role']}:[/] {escape(turn['content'])}")
            console.print(f"[dim]reference:[/] {escape(item['reference'])}")
            console.print(f"[bold cyan]A:[/] {escape(item['a'])}")
            console.print(f"[bold magenta]B:[/] {escape(item['b'])}")
        try:
            answer = _ask("better? [a/b/t/s/q] ", args.json).strip().lower()
        except EOFError:
            break
        if answer == "q":
            break
        if answer in keys:
            session.vote(keys[answer])
        else:
            print("answer a, b, t (tie), s (skip) or q (stop)")
    tally = session.save()
    if args.json:
        print_json(tally)
    else:
        rate = f"{tally['win_rate']:.1%}" if tally["win_rate"] is not None else "-"
        print(f"{tally['reviewer']}: tuned better {tally['tuned_wins']}, ties {tally['ties']}, base better "
              f"{tally['base_wins']}, skipped {tally['skipped']}, not reached {tally['unreviewed']}; tuned win rate "
              f"{rate} (ties count half); saved to eval.json and the audit log")
    return 0
