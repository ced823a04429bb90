"""`appliance ask` and `appliance chat`: answers through llama.cpp."""

from __future__ import annotations

import sys

from .common import command, print_json


def parsers(add) -> None:
    a = add("ask", "one answer from a model (run id, model id or .gguf path)")
    a.add_argument("model")
    a.add_argument("--prompt", required=True)
    a.add_argument("--system")
    a.add_argument("--max-tokens", type=int, default=256)
    a.add_argument("--temperature", type=float, default=0.0)
    sampling_flags(a, seed=0)
    a.add_argument("--threads", type=int)

    c = add("chat", "interactive chat with a model (run id, model id or .gguf path)", json_out=False)
    c.add_argument("model")
    c.add_argument("--system")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    sampling_flags(c, seed=None)


def sampling_flags(p, seed: int | None) -> None:
    """ask's and chat's sampling knobs beyond the temperature (defaults: what they always used)."""
    from ..infer import MIN_P, REPEAT_PENALTY, TOP_K, TOP_P

    p.add_argument("--top-p", type=float, default=TOP_P, help=f"nucleus sampling (default {TOP_P})")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"keep the k likeliest tokens; 0 keeps all (default {TOP_K})")
    p.add_argument("--min-p", type=float, default=MIN_P, help=f"drop tokens below this share of the likeliest (default {MIN_P})")
    p.add_argument("--repeat-penalty", type=float, default=REPEAT_PENALTY, help=f"1 is none (default {REPEAT_PENALTY})")
    p.add_argument("--seed", type=int, default=seed,
                   help="the sampling seed (default 0)" if seed is not None else
                   "the sampling seed of every turn (default: the turn's position, different each turn)")


def sampling(args) -> dict:
    return {"top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed}


@command("ask")
def _ask(args) -> int:
    from ..infer import ask

    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = ask(args.model, args.prompt, system=args.system, max_tokens=args.max_tokens,
                 temperature=args.temperature, threads=args.threads, on_text=stream, **sampling(args))
    if args.json:
        print_json(result)
    else:
        print()
    return 0


@command("chat")
def _chat(args) -> int:
    from ..infer import Chat

    with Chat(args.model, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
              **sampling(args)) as chat:
        print(f"chatting with {chat.model_path.name} (template from the GGUF); an empty line or Ctrl-D ends")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            if not line.strip():
                break
            sys.stdout.write("model> ")
            chat.say(line, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            print()
    return 0
