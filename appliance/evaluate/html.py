"""``runs/<id>/eval.html``: the evaluation as a page people read, self-contained (inline CSS and SVG charts, no
script, no font, no link to fetch: it opens on a machine with no network).

Charts: the training and validation loss curves (from the run's events), base against tuned per metric with
95% interval whiskers, the forgetting check per task, the judge's and the reviewers' tallies, and size against
quality per quantization. Examples side by side appear only when asked for (``appliance eval --examples N``):
they are dataset text, which otherwise never leaves the vault; without them the page says so.
"""

from __future__ import annotations

import html
from pathlib import Path

from .names import LOWER_BETTER, SCORES, better, delta, harness_rows, label, span, value

BASE, TUNED, ACCENT = "#7f8c9a", "#2a7de1", "#e8a33d"
CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 980px; padding: 0 1em; color: #1d232a; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #dde;
padding-bottom: 0.2em; } table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 0.25em 0.7em;
border-bottom: 1px solid #eee; text-align: right; } td:first-child, th:first-child { text-align: left; }
.dim { color: #6b7785; } .good { color: #1c8c46; font-weight: 600; } .bad { color: #c0392b; font-weight: 600; }
.note { background: #fff6e0; border-left: 4px solid #e8a33d; padding: 0.5em 0.8em; }
.warn { background: #fdecea; border-left: 4px solid #c0392b; padding: 0.5em 0.8em; }
pre { white-space: pre-wrap; background: #f6f8fa; padding: 0.6em; font-size: 0.85em; }
.examples td { text-align: left; vertical-align: top; font-size: 0.85em; max-width: 230px; }
svg text { font: 12px system-ui, sans-serif; fill: #1d232a; }
"""


def write(run_id: str, report: dict, examples: list[dict] | None = None) -> Path:
    """Write ``runs/<id>/eval.html`` from an evaluation report (``eval.json``'s content); returns its path."""
    from .. import runs
    from ..workspace import write_atomic

    path = runs.run_dir(run_id) / "eval.html"
    write_atomic(path, page(run_id, report, _losses(runs.run_dir(run_id) / "events.jsonl"), examples))
    return path


def page(run_id: str, r: dict, losses: dict[str, list[tuple[float, float]]], examples: list[dict] | None) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>evaluation of {e(run_id)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Evaluation of run {e(run_id)}</h1>",
             f"<p class='dim'>{e(r.get('split', 'held-out'))} split, {r['samples']} examples; base = "
             f"{e(str(r.get('reference', 'base model')))}. Every figure with its 95% bootstrap interval; a difference "
             "is called beyond the noise when its paired interval excludes zero.</p>"]
    if r.get("note"):
        parts.append(f"<p class='note'>{e(r['note'])}</p>")
    verdict = label(r.get("decisive", r["metrics"][-1]))
    parts.append(f"<p class='{'good' if r.get('tuned_beats_base') else 'bad'}'>The tuned model "
                 f"{'beats' if r.get('tuned_beats_base') else 'does not beat'} its base on {e(verdict)}.</p>")

    parts.append("<h2>Training</h2>")
    parts.append(line_chart(losses, "chart-loss", "step", "loss") if any(losses.values())
                 else "<p class='dim'>no loss curve recorded for this run</p>")

    parts.append("<h2>Base against tuned</h2>")
    bars = [(m, r["base"][m], r["intervals"]["base"].get(m), r["tuned"][m], r["intervals"]["tuned"].get(m))
            for m in r["metrics"] if m not in LOWER_BETTER and m != "preference_margin"]
    parts.append(metric_bars(bars, "chart-metrics"))
    rows = []
    for m in r["metrics"]:
        b, t, d = r["base"][m], r["tuned"][m], r.get("differences", {}).get(m)
        cls = ("good" if better(m, t, b) else "bad") if m in r.get("significant", []) else ""
        rows.append(f"<tr><td>{e(label(m))}</td><td>{value(m, b)}</td><td class='dim'>{e(span(m, r['intervals']['base'].get(m)))}</td>"
                    f"<td>{value(m, t)}</td><td class='dim'>{e(span(m, r['intervals']['tuned'].get(m)))}</td>"
                    f"<td class='{cls}'>{e(delta(m, t - b))}</td><td class='dim'>{e(span(m, d))}</td></tr>")
    parts.append("<table><tr><th>metric</th><th>base</th><th>95%</th><th>tuned</th><th>95%</th><th>difference</th>"
                 f"<th>95%</th></tr>{''.join(rows)}</table>")

    f = r.get("forgetting")
    parts.append("<h2>Forgetting check</h2>")
    if f:
        parts.append(f"<p class='dim'>{f['items']} general-ability items ({e(f['set'])}); chance {f['chance']:.1%}.</p>")
        task_bars = [(t, v["base"], None, v["tuned"], None) for t, v in f["tasks"].items()]
        task_bars.append(("all", f["base"], f["intervals"]["base"], f["tuned"], f["intervals"]["tuned"]))
        parts.append(metric_bars(task_bars, "chart-forgetting", labels=False))
        parts.append(f"<p class='warn'>{e(f['warning'])}</p>" if f["forgetting"] else
                     f"<p class='good'>No forgetting beyond the noise: difference {(f['tuned'] - f['base']) * 100:+.1f} "
                     f"points {e(span('share', f['difference']))}.</p>")
    else:
        parts.append("<p class='dim'>not run (<code>--general 0</code>)</p>")

    parts.append("<h2>Judge and reviews</h2>")
    tallies = []
    j = r.get("judge")
    if j:
        t = j["tally"]
        tallies.append((f"judge {j['model']}", t["tuned_wins"], t["ties"], t["base_wins"]))
    for rv in r.get("reviews", []):
        tallies.append((f"review by {rv['reviewer']}", rv["tuned_wins"], rv["ties"], rv["base_wins"]))
    if tallies:
        parts.append(tally_bars(tallies, "chart-judge"))
    if j:
        parts.append(f"<p>Judge <b>{e(j['model'])}</b>, {j['items']} pairs asked in both orders: tuned win rate "
                     f"{j['win_rate']:.1%} {e(span('share', j['win_rate_interval']))} (ties count half), consistency "
                     f"{j['consistency']:.1%}. <span class='dim'>{e(j['advisory'])}"
                     f"{'; ' + e(j['note']) if j.get('note') else ''}.</span></p>")
        parts.append(f"<details><summary>the judge's instructions</summary><pre>{e(j['prompt']['system'])}\n\n"
                     f"{e(j['prompt']['user'])}\n\nverdict: {e(j['prompt']['verdict'])}</pre></details>")
    for rv in r.get("reviews", []):
        rate = f"{rv['win_rate']:.1%} {span('share', rv['win_rate_interval'])}" if rv["win_rate"] is not None else "-"
        parts.append(f"<p>Blind review by <b>{e(rv['reviewer'])}</b> ({e(rv['at'])}): {rv['items']} items, tuned better "
                     f"{rv['tuned_wins']}, tie {rv['ties']}, base better {rv['base_wins']}, skipped {rv['skipped']}; "
                     f"tuned win rate {e(rate)}.</p>")
    if not tallies:
        parts.append("<p class='dim'>no judge (<code>appliance eval RUN --judge MODEL</code>) and no review "
                     "(<code>appliance eval RUN --review</code>) yet</p>")

    q = r.get("quants")
    parts.append("<h2>Quantizations: size against quality</h2>")
    if q:
        by = q["by_quant"]
        parts.append(scatter([(name, v["bytes"] / 2**20, v["kl_divergence"]) for name, v in by.items()],
                             "chart-quants", "file size (MiB)", "KL divergence from f16"))
        parts.append("<table><tr><th>quant</th><th>size</th><th>perplexity</th><th>KL vs f16</th><th>same top-1</th></tr>"
                     + "".join(f"<tr><td>{e(name)}</td><td>{v['bytes'] / 2**20:.1f} MiB</td><td>{v['perplexity']:.3f}</td>"
                               f"<td>{v['kl_divergence']:.4f}</td><td>{v['same_top1']:.1%}</td></tr>" for name, v in by.items())
                     + f"</table><p class='dim'>measured by <code>appliance export</code> on {q['samples']} "
                       f"{e(q['split'])} answers</p>")
    else:
        parts.append("<p class='dim'>not measured: re-export the run (<code>appliance export</code> measures each file)</p>")

    hx = r.get("harness")
    if hx:
        parts.append("<h2>lm-evaluation-harness</h2>")
        rows = [f"<tr><td>{e(task)}</td><td>{e(metric)}</td><td>{b:.3f}</td>"
                f"<td>{'-' if t is None else f'{t:.3f}'}</td><td class='dim'>"
                f"{'' if se is None else f'± {se:.3f}'}</td></tr>" for task, metric, b, t, se in harness_rows(hx)]
        parts.append("<table><tr><th>task</th><th>metric</th><th>base</th><th>tuned</th><th>stderr</th></tr>"
                     + "".join(rows) + f"</table><p class='dim'>{e(hx['backend'])}"
                     + (f", {hx['limit']} items a task" if hx.get("limit") else "") + "</p>")

    parts.append("<h2>Examples</h2>")
    if examples:
        parts.append("<table class='examples'><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>"
                     + "".join("<tr>" + "".join(f"<td>{e(x[k])}</td>" for k in ("prompt", "reference", "base", "tuned"))
                               + "</tr>" for x in examples) + "</table>")
    else:
        parts.append("<p class='dim'>withheld: they are dataset text, which stays in the vault. The TUI's Eval screen "
                     "shows them in memory; <code>appliance eval RUN --examples N</code> writes N into this page "
                     "(recorded in the audit log).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _losses(path: Path) -> dict[str, list[tuple[float, float]]]:
    from ..events import read

    train, validation = [], []
    if path.is_file():
        for ev in read(path):
            step = ev.data.get("step")
            if not isinstance(step, (int, float)):
                continue
            if ev.type == "progress" and isinstance(ev.data.get("loss"), (int, float)):
                train.append((float(step), float(ev.data["loss"])))
            elif ev.type == "metric" and isinstance(ev.data.get("eval_loss"), (int, float)):
                validation.append((float(step), float(ev.data["eval_loss"])))
    return {"training loss": train, "validation loss": validation}


# -- SVG --------------------------------------------------------------------------------------------------------

W, H, L, B = 900, 260, 60, 36  # size, left and bottom margins


def line_chart(series: dict[str, list[tuple[float, float]]], cid: str, xlabel: str, ylabel: str) -> str:
    points = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x): return L + (x - x0) / (x1 - x0) * (W - L - 20)
    def sy(y): return H - B - (y - y0) / (y1 - y0) * (H - B - 20)

    out = [_svg_open(cid, f"{ylabel} per {xlabel}"), _axes(xlabel, ylabel)]
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        out.append(f"<text x='{L - 6}' y='{sy(y) + 4:.1f}' text-anchor='end'>{y:.2f}</text>")
    out.append(f"<text x='{L}' y='{H - B + 16}'>{x0:g}</text><text x='{W - 20}' y='{H - B + 16}' "
               f"text-anchor='end'>{x1:g}</text>")
    for (name, pts), color in zip(series.items(), (TUNED, ACCENT)):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f"<polyline class='series' data-name='{html.escape(name)}' points='{path}' fill='none' "
                   f"stroke='{color}' stroke-width='2'/>")
        out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{color}'/>" for x, y in pts[-200:]]
    out.append(_legend([(name, color) for name, color in zip(series, (TUNED, ACCENT)) if series[name]]))
    return "".join(out) + "</svg>"


def metric_bars(rows: list[tuple], cid: str, labels: bool = True) -> str:
    """Base and tuned bars per row on a 0-1 scale (0-100 scores scaled), with interval whiskers."""
    row_h, top = 34, 10
    height = top + row_h * len(rows) + 40
    left, width = 170, W - 170 - 80

    def scale(metric, v):
        return (v / 100 if metric in SCORES else v) if v is not None else None

    out = [_svg_open(cid, "base and tuned per metric", height)]
    for i, (metric, b, bci, t, tci) in enumerate(rows):
        y = top + i * row_h
        name = label(metric) if labels else metric
        out.append(f"<text x='{left - 8}' y='{y + 19}' text-anchor='end'>{html.escape(name)}</text>")
        for j, (v, ci, color, who) in enumerate(((b, bci, BASE, "base"), (t, tci, TUNED, "tuned"))):
            sv = max(0.0, min(1.0, scale(metric, v)))
            yy = y + 4 + j * 13
            out.append(f"<rect class='bar' data-model='{who}' data-metric='{html.escape(metric)}' x='{left}' y='{yy}' "
                       f"width='{sv * width:.1f}' height='11' fill='{color}'/>")
            if ci:
                lo, hi = (max(0.0, min(1.0, scale(metric, c))) for c in ci)
                out.append(f"<line class='whisker' x1='{left + lo * width:.1f}' x2='{left + hi * width:.1f}' "
                           f"y1='{yy + 5.5}' y2='{yy + 5.5}' stroke='#1d232a' stroke-width='1.2'/>")
            out.append(f"<text x='{left + width + 6}' y='{yy + 10}'>{value(metric, v) if labels else f'{v:.1%}'}</text>")
    out.append(_legend([("base", BASE), ("tuned", TUNED)], y=height - 14))
    return "".join(out) + "</svg>"


def tally_bars(rows: list[tuple[str, int, int, int]], cid: str) -> str:
    row_h, left = 30, 220
    height = 10 + row_h * len(rows) + 40
    width = W - left - 20
    out = [_svg_open(cid, "tallies: tuned better, tie, base better", height)]
    for i, (name, wins, ties, losses) in enumerate(rows):
        y = 10 + i * row_h
        total = max(wins + ties + losses, 1)
        out.append(f"<text x='{left - 8}' y='{y + 15}' text-anchor='end'>{html.escape(name)}</text>")
        x = left
        for count, color, what in ((wins, TUNED, "tuned"), (ties, "#c9d1d9", "tie"), (losses, BASE, "base")):
            w = count / total * width
            out.append(f"<rect class='tally' data-part='{what}' x='{x:.1f}' y='{y}' width='{w:.1f}' height='20' "
                       f"fill='{color}'/>")
            if count:
                out.append(f"<text x='{x + w / 2:.1f}' y='{y + 15}' text-anchor='middle'>{count}</text>")
            x += w
    out.append(_legend([("tuned better", TUNED), ("tie", "#c9d1d9"), ("base better", BASE)], y=height - 14))
    return "".join(out) + "</svg>"


def scatter(points: list[tuple[str, float, float]], cid: str, xlabel: str, ylabel: str) -> str:
    x1 = max(p[1] for p in points) * 1.1 or 1
    y1 = max(p[2] for p in points) * 1.15 or 1

    def sx(x): return L + x / x1 * (W - L - 20)
    def sy(y): return H - B - y / y1 * (H - B - 20)

    out = [_svg_open(cid, f"{ylabel} against {xlabel}"), _axes(xlabel, ylabel)]
    out.append(f"<text x='{L - 6}' y='{sy(0) + 4:.1f}' text-anchor='end'>0</text>"
               f"<text x='{L + 6}' y='{sy(y1) + 4:.1f}'>{y1:.3g}</text>"
               f"<text x='{W - 20}' y='{H - B + 16}' text-anchor='end'>{x1:.0f}</text>")
    for name, x, y in points:
        out.append(f"<circle class='point' data-quant='{html.escape(name)}' cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='5' "
                   f"fill='{TUNED}'/><text x='{sx(x) + 8:.1f}' y='{sy(y) - 6:.1f}'>{html.escape(name)}</text>")
    return "".join(out) + "</svg>"


def _svg_open(cid: str, title: str, height: int = H) -> str:
    return (f"<svg id='{cid}' viewBox='0 0 {W} {height}' width='100%' role='img'>"
            f"<title>{html.escape(title)}</title>")


def _axes(xlabel: str, ylabel: str) -> str:
    return (f"<line x1='{L}' y1='{H - B}' x2='{W - 20}' y2='{H - B}' stroke='#9aa5b1'/>"
            f"<line x1='{L}' y1='10' x2='{L}' y2='{H - B}' stroke='#9aa5b1'/>"
            f"<text x='{(W + L) / 2:.0f}' y='{H - 6}' text-anchor='middle'>{html.escape(xlabel)}</text>"
            f"<text x='14' y='{(H - B) / 2:.0f}' transform='rotate(-90 14 {(H - B) / 2:.0f})' "
            f"text-anchor='middle'>{html.escape(ylabel)}</text>")


def _legend(items: list[tuple[str, str]], y: int = 16) -> str:
    out, x = [], W - 20 - 150 * len(items)
    for name, color in items:
        out.append(f"<rect x='{x}' y='{y - 10}' width='12' height='12' fill='{color}'/>"
                   f"<text x='{x + 18}' y='{y}'>{html.escape(name)}</text>")
        x += 150
    return "".join(out)
