"""`appliance demo` and `appliance tui`: the whole pipeline at once, and the terminal UI."""

from __future__ import annotations

from .common import command, print_json


def demo_parser(add) -> None:
    d = add("demo", "the whole pipeline on the embedded default model and the demo dataset")
    d.add_argument("--base", help="a .gguf file to use instead of the embedded SmolLM2-135M-Instruct")
    d.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    d.add_argument("--eval-samples", type=int, default=48, help="test examples scored for base vs tuned")
    d.add_argument("--dpo", action="store_true", help="then DPO: the demo run trains on generated preference pairs "
                   "and is scored against itself on held-out pairs (runs the demo first if it has not run)")


def tui_parser(add) -> None:
    tu = add("tui", "the terminal UI (also what `appliance` with no command opens in a terminal)", json_out=False)
    tu.add_argument("--simulate", metavar="PROFILE", help="show a named hardware profile instead of this machine's")


@command("demo")
def _demo(args) -> int:
    from ..demo import run_demo, run_dpo_demo

    if args.dpo:
        result = run_dpo_demo(steps=args.steps, eval_samples=args.eval_samples, json_mode=args.json)
    else:
        result = run_demo(base=args.base, steps=args.steps, eval_samples=args.eval_samples, json_mode=args.json)
    if args.json:
        print_json(result)
    return 0 if result["tuned_beats_base"] else 5


@command("tui")
def _tui(args) -> int:
    from .. import hardware
    from ..errors import InvalidInput

    if args.simulate is not None and args.simulate not in hardware.PROFILES:
        raise InvalidInput(f"unknown hardware profile {args.simulate!r}; choose one of: {', '.join(hardware.PROFILES)}.")
    try:
        from tui.app import run  # textual loads here only: the core never imports it
    except ModuleNotFoundError as e:
        if e.name not in ("tui", "textual"):
            raise
        raise InvalidInput(f"the terminal UI is not installed ({e}); install the appliance with its dependencies "
                           "(textual) or use the commands.") from None
    return run(simulate=args.simulate)
