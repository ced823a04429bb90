"""Terminal rendering of events and reports with rich (the CLI's only view code)."""

from __future__ import annotations

from typing import Iterable

from .events import Event


def split_counts(records: dict[str, int]) -> str:
    """A dataset's record counts per split, in words ("400 train, 48 validation, 48 test"); the import report's file
    is not a split."""
    return ", ".join(f"{n} {name}" for name, n in records.items() if name != "report")


def reporter(quiet: bool = False):
    """An Emit that prints stage, warning and metric events as plain lines (nothing when quiet)."""
    from rich.console import Console

    console = None if quiet else Console(highlight=False)

    def emit(event: Event) -> None:
        if console is None:
            return
        if event.type == "stage":
            console.print(f"[bold cyan]»[/] {event.message}")
        elif event.type == "warning":
            console.print(f"[yellow]warning:[/] {event.message}")
        elif event.type == "metric" and event.message:
            console.print(f"  {event.message}")
        elif event.type == "progress" and event.message:  # a step of a long stage: merge's shards
            console.print(f"  [dim]{event.message}[/]")
    return emit


def follow_training(events: Iterable[Event], quiet: bool = False) -> None:
    """Draw a progress bar with loss, learning rate, tokens/s and memory until the run ends."""
    if quiet:
        for _ in events:
            pass
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(highlight=False)
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, transient=False)
    task = None
    eval_loss = None
    with progress:
        for e in events:
            if e.type == "stage":
                progress.console.print(f"[bold cyan]»[/] {e.message}")
            elif e.type == "warning":
                progress.console.print(f"[yellow]warning:[/] {e.message}")
            elif e.type == "failed":
                progress.console.print(f"[red]failed:[/] {e.message}")
            elif e.type == "metric" and "eval_loss" in e.data:
                eval_loss = e.data["eval_loss"]
            elif e.type == "progress":
                d = e.data
                if task is None:
                    task = progress.add_task("train", total=d.get("max_steps"), info="")
                info = []
                if "loss" in d:
                    info.append(f"loss {d['loss']:.4f}")
                if eval_loss is not None:
                    info.append(f"val {eval_loss:.4f}")
                if "learning_rate" in d:
                    info.append(f"lr {d['learning_rate']:.1e}")
                if "tokens_per_s" in d:
                    info.append(f"{d['tokens_per_s']:.0f} tok/s")
                if "reward_margin" in d:  # DPO
                    info.append(f"margin {d['reward_margin']:.3f} acc {d.get('reward_accuracy', 0):.0%}")
                if "rss_bytes" in d:
                    info.append(f"rss {d['rss_bytes'] / 2**30:.2f} GiB")
                progress.update(task, completed=d.get("step", 0), total=d.get("max_steps"), info="  ".join(info))


def eval_table(report: dict):
    """Base against tuned, each figure over its 95% interval (dim) and the paired difference's; a difference whose
    interval excludes zero is coloured (green better, red worse), one within the noise is not. Fits 80 columns."""
    from rich.table import Table

    from .evaluate.names import better, delta, label, span, value

    base = f"; base = {report['reference']}" if report.get("reference") else ""
    table = Table(title=f"{report.get('split', 'held-out')} split: {report['samples']} examples{base}; under each "
                        "figure its 95% interval", title_justify="left", caption=report.get("note"),
                  caption_justify="left")
    table.add_column("metric")
    for name in ("base", "tuned", "difference"):
        table.add_column(name, justify="right")
    intervals, differences = report.get("intervals", {}), report.get("differences", {})

    def cell(metric, text, pair, style=""):
        shown = f"[{style}]{text}[/]" if style else text
        return f"{shown}\n[dim]{span(metric, pair)}[/]" if pair else shown

    for metric in report["metrics"]:
        b, t = report["base"][metric], report["tuned"][metric]
        significant = metric in report.get("significant", [])
        style = ("green" if better(metric, t, b) else "red") if significant else ""
        table.add_row(label(metric), cell(metric, value(metric, b), intervals.get("base", {}).get(metric)),
                      cell(metric, value(metric, t), intervals.get("tuned", {}).get(metric)),
                      cell(metric, delta(metric, t - b), differences.get(metric), style))
    return table


def quant_table(quality: dict):
    """Size against quality per exported quantization, and which fits edge boxes of common sizes."""
    from rich.table import Table

    from .evaluate.names import span
    from .evaluate.quants import fits_by_size

    by = quality["by_quant"]
    fits = fits_by_size(by)
    caption = "best fit (lowest KL within the size): " + ", ".join(f"{g:g} GiB: {q}" for g, q in fits) if fits else ""
    table = Table(title=f"quality per quantization on {quality['samples']} {quality['split']} answers",
                  title_justify="left", caption=caption, caption_justify="left")
    for name in ("quant", "size", "perplexity", "KL vs f16", "same top-1"):
        table.add_column(name, justify="left" if name == "quant" else "right")
    for q, v in by.items():
        lo, hi = v["kl_interval"]
        table.add_row(q, f"{v['bytes'] / 2**20:.1f} MiB",
                      f"{v['perplexity']:.3f}\n[dim]{span('perplexity', v['perplexity_interval'])}[/]",
                      f"{v['kl_divergence']:.4f}\n[dim][{lo:.4f}, {hi:.4f}][/]", f"{v['same_top1']:.1%}")
    return table


def forgetting_table(f: dict):
    """General ability, base against tuned, per task and overall, with the verdict."""
    from rich.table import Table

    from .evaluate.names import span

    verdict = (f"[red]{f['warning']}[/]" if f["forgetting"] else
               "no forgetting beyond the noise (the difference's 95% interval reaches zero or above)")
    table = Table(title=f"forgetting check: {f['items']} general-ability items, {f['set']}; chance "
                        f"{f['chance']:.1%}", title_justify="left", caption=verdict, caption_justify="left")
    for name in ("task", "items", "base", "tuned"):
        table.add_column(name, justify="left" if name == "task" else "right")
    for task, t in f["tasks"].items():
        table.add_row(task, str(t["items"]), f"{t['base']:.1%}", f"{t['tuned']:.1%}")
    table.add_row("[bold]all", str(f["items"]), f"[bold]{f['base']:.1%}[/] {span('share', f['intervals']['base'])}",
                  f"[bold]{f['tuned']:.1%}[/] {span('share', f['intervals']['tuned'])}")
    table.add_row("difference", "", "", f"{(f['tuned'] - f['base']) * 100:+.1f} pts {span('share', f['difference'])}")
    return table


def judge_table(judge: dict):
    """The judge's tally: tuned wins, ties, base wins (with 95% intervals), its consistency, and that it is
    advisory."""
    from rich.table import Table

    from .evaluate.names import span

    caption = judge["advisory"] + (f"; {judge['note']}" if judge.get("note") else "")
    table = Table(title=f"judge {judge['model']}: {judge['items']} pairs, each asked in both orders",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("verdict")
    table.add_column("pairs", justify="right")
    table.add_column("share", justify="right")
    table.add_column("95%", justify="right", style="dim")
    tally = judge["tally"]
    for key, name, count in (("tuned", "tuned better", tally["tuned_wins"]), ("tie", "tie (or inconsistent)",
                             tally["ties"]), ("base", "base better", tally["base_wins"])):
        table.add_row(name, str(count), f"{judge['shares'][key]:.1%}", span("share", judge["share_intervals"][key]))
    table.add_row("tuned win rate (ties half)", "", f"{judge['win_rate']:.1%}", span("share", judge["win_rate_interval"]))
    table.add_row("judge consistency", "", f"{judge['consistency']:.1%}", span("share", judge["consistency_interval"]))
    return table


def import_report(report: dict):
    """The import report as a rich renderable: what was read, kept, rejected (with examples) and split."""
    from rich.console import Group
    from rich.table import Table

    from .importer.formats import REASONS

    imported = report["imported"]
    head = (f"{report['file']}: {report['records_read']} records read as {report['kind'].upper()}, "
            f"format {report['format']}; imported {imported['train']} train + {imported['validation']} validation"
            + (f" + {imported['test']} test" if "test" in imported else ""))
    parts: list = [head]
    leakage = report.get("leakage") or {}
    if leakage.get("moved"):
        pairs = leakage["pairs"]
        listed = "; ".join(f"{p['split']} {p['where']} ~ {p['to']} {p['similar_to']}" for p in pairs[:5])
        more = f" and {leakage['moved'] - 5} more (`data show NAME --report --json`)" if leakage["moved"] > 5 else ""
        parts.append(f"[yellow]leakage:[/] {leakage['moved']} held-out record(s) were near-copies (Jaccard >= "
                     f"{leakage['threshold']}) of records in an earlier split and moved there: {listed}{more}")
    if report.get("salvaged"):
        s = report["salvaged"]
        parts.append(f"[yellow]salvaged:[/] the file is cut off at byte {s['cut_at_byte']} (line {s['cut_at_line']}); "
                     f"the {s['kept']} complete records before the cut were read")
    table = Table("rejected because", "records", "examples (where: why)", title_justify="left")
    for reason, n in report["rejected"].items():
        if not n:
            continue
        examples = report.get("examples", {}).get(reason, [])
        text = "\n".join(f"{e['where']}{' ' + e['field'] if e['field'] else ''}: {e['detail']}" for e in examples)
        table.add_row(REASONS.get(reason, reason), str(n), text)
    if table.row_count:
        parts.append(table)
    else:
        parts.append("no record was rejected")
    return Group(*parts)
