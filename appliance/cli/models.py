"""`appliance models import|list`: base models."""

from __future__ import annotations

from .common import command, rich_console, print_json


def parsers(add) -> None:
    m = add("models", "imported base models", json_out=False)
    msub = m.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    mi = msub.add_parser("import", help="import a .gguf file or a Hugging Face folder (safetensors only)")
    mi.add_argument("path")
    mi.add_argument("--name", help="model id (default: from the file)")
    mi.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="precision of the imported weights (GGUF is dequantized to it)")
    mi.add_argument("--json", action="store_true")
    ml = msub.add_parser("list", help="list imported models")
    ml.add_argument("--json", action="store_true")


@command("models import")
def _models_import(args) -> int:
    from ..models import import_model
    from ..render import reporter

    m = import_model(args.path, name=args.name, dtype=args.dtype, emit=reporter(args.json))
    if args.json:
        print_json(m)
    else:
        print(f"imported {m['id']} ({m['details'].get('architecture')}, {len(m['files'])} files)")
    return 0


@command("models list")
def _models_list(args) -> int:
    from ..models import list_models

    ms = list_models()
    if args.json:
        print_json({"models": ms})
        return 0
    from rich.table import Table

    table = Table("id", "architecture", "params", "dtype", "source")
    for m in ms:
        d = m["details"]
        params = f"{d['parameters'] / 1e6:.0f}M" if d.get("parameters") else "-"
        table.add_row(m["id"], str(d.get("architecture")), params, str(d.get("dtype", "-")),
                      d.get("source", {}).get("format", "-"))
    rich_console().print(table if ms else "no models yet: `appliance models import PATH`")
    return 0
