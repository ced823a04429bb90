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

    e = add("eval", "score base vs tuned on the test split, with 95% intervals")
    e.add_argument("run")
    e.add_argument("--samples", type=int, default=48)


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
        print(f"merged {result['label']} into {result['path']} (max |logit difference| vs base+adapter: "
              f"{result['max_abs_logit_diff']:.2e})")
    return 0


@command("export")
def _export(args) -> int:
    from ..export import export
    from ..render import reporter

    quants = [q.strip() for q in args.quant.split(",")] if args.quant else None
    result = export(args.run, quants, emit=reporter(args.json), checkpoint=args.checkpoint)
    if args.json:
        print_json(result)
        return 0
    print(f"exported {result['label']}")
    for q, f in result["files"].items():
        print(f"{q:>8}: {f['path']} ({f['bytes'] / 2**20:.1f} MiB)")
    p = result["parity"]
    print(f"  checks: template tokens identical on {p['template_conversations']} conversations; "
          f"stops at {p['eot_token']!r}; top-1 agreement {p['top1_agreement']:.2%} over {p['positions']} positions")
    return 0


@command("eval")
def _eval(args) -> int:
    from ..evaluate import evaluate
    from ..render import eval_table, reporter

    report = evaluate(args.run, samples=args.samples, emit=reporter(args.json))
    if args.json:
        print_json(report)
    else:
        rich_console().print(eval_table(report))
    return 0
