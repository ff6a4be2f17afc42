"""The HTML a person reads: a comparison's report.html, and one page for several comparisons.

A report opens with the answer (which configuration, its skill and cost, why), then the Pareto front
of skill against CPU time, then the tables of skill, stability and speed with what each column
means, the figures at full width with captions that say what every line, band and bar is, and the
settings. Each page is one file: the figures are embedded, so it can be opened or sent alone.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Optional, Sequence

from ..files import atomic_write_text
from .answer import Answer
from .plots import FIGURES
from .report import GROUPS, NOTES, cell, columns, number
from .summary import Row, label

STYLE = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1200px;margin:2em auto;
 padding:0 1.5em}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
.lede{color:#555;margin-top:0}
.answer{border-left:6px solid #2a7ab9;background:#f3f8fc;padding:.8em 1.2em;margin:1.2em 0}
.answer .verdict{font-size:1.2em;margin:.2em 0 .5em}.answer ul{margin:.3em 0;padding-left:1.3em}
.answer .cost{color:#333}.dependency{font-size:14px;color:#333;margin:.3em 0}
table{border-collapse:collapse;font-size:14px;margin:.6em 0}td,th{border-bottom:1px solid #e3e3e3;
 padding:4px 10px;text-align:right}th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}
tr.bad td{color:#b00}tr.chosen td{font-weight:600}
.notes{font-size:13px;color:#555;margin-top:.2em}
figure{margin:1.5em 0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:14px;color:#444;margin-top:.4em}
.bad{color:#b00}.small{font-size:13px;color:#666}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def card_html(answer: Optional[Answer], strategies: int = 1) -> str:
    """The answer card: the verdict (configuration in bold), its cost, the reasons, and the
    dependency verdict when the task's dependency length is known."""
    if answer is None:
        return "<section class='answer'><p class='verdict bad'>No configuration finished.</p></section>"
    name = label(answer.choice, strategies)
    verdict = _e(answer.headline).replace(_e(name), f"<b>{_e(name)}</b>", 1)
    why = "".join(f"<li>{_e(w)}</li>" for w in answer.why)
    dependency = ""
    if answer.dependency:
        items = "".join(f"<li>{_e(line.strip())}</li>" for line in answer.dependency[1:])
        dependency = f"<p class='dependency'>{_e(answer.dependency[0])}</p><ul class='dependency'>{items}</ul>"
    return (f"<section class='answer'><p class='verdict'>{verdict}</p><p class='cost'>{_e(answer.cost)}</p>"
            f"<ul>{why}</ul>{dependency}</section>")


def front_html(answer: Optional[Answer], meta: dict) -> str:
    """The Pareto front as a table: who holds it from which CPU time on, and the metric there."""
    if answer is None or not answer.front:
        return "<p class='small'>No front: no run reported its validation metric.</p>"
    rows = "".join(
        f"<tr><td>{_e(s.config)}</td><td>{s.start:.3g} s</td><td>{s.stop:.3g} s</td>"
        f"<td>{s.first:.4g}</td><td>{s.last:.4g}</td></tr>" for s in answer.front
    )
    metric = _e(meta.get("metric_name", "metric"))
    tolerance = (f"<p class='small'>A configuration joins the front only where it improves on it by more than "
                 f"{answer.front_tolerance:.2g}, the median spread over seeds: smaller gains are noise.</p>"
                 if answer.front_tolerance > 0 else "")
    return ("<table><thead><tr><th>configuration</th><th>on the front from</th><th>until</th>"
            f"<th>{metric} there</th><th>{metric} at the end of its stretch</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{tolerance}")


def tables_html(rows: Sequence[Row], meta: dict, chosen: Optional[Row] = None) -> str:
    """Skill, stability and speed as three tables, each followed by what its columns mean."""
    strategies = len({r["strategy"] for r in rows})
    parts = []
    for group in GROUPS:
        cols = columns(group, meta)
        head = "".join(f"<th>{_e(t)}</th>" for t, _, _ in cols)
        body = []
        for row in rows:
            kind = "bad" if row.get("diverged") or row.get("failed") else ("chosen" if row is chosen else "")
            cells = "".join(f"<td>{_e(cell(row, k, c))}</td>" for _, k, c in cols)
            body.append(f"<tr class='{kind}'><td>{_e(label(row, strategies))}</td>{cells}</tr>")
        notes = "; ".join(f"<b>{_e(t)}</b>: {_e(NOTES[key])}" for t, key, _ in cols if key in NOTES)
        parts.append(f"<h3>{_e(group)}</h3><table><thead><tr><th>configuration</th>{head}</tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table><p class='notes'>{notes}</p>")
    return "".join(parts)


def settings_html(meta: dict) -> str:
    """The settings every run shared, as a small table."""
    settings = dict(meta.get("settings", {}))
    shown = {
        "budget": settings.get("budget") or f"epochs:{settings.get('epochs')}",
        "epochs (cap)": settings.get("epochs") if settings.get("budget") else None,
        "seeds": ", ".join(str(s) for s in settings.get("seeds", [])),
        "optimizer": f"{settings.get('optimizer')}, lr {number(settings.get('lr'))}",
        "gradient clipping": number(settings.get("clip")) if settings.get("clip") else "none",
        "strategy": settings.get("strategy"),
        "model": f"{settings.get('model')}, {settings.get('hidden')} hidden units",
        "steps per train_on call": settings.get("segment_length") or "the whole split",
        "wall-clock limit per run": f"{settings['max_seconds']:g} s" if settings.get("max_seconds") else None,
        "task options": ", ".join(f"{k}={v}" for k, v in dict(settings.get("task_options", {})).items()) or "defaults",
        "training data": f"{meta.get('train_streams')} streams of {meta.get('train_steps')} steps",
    }
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in shown.items() if v is not None)
    return f"<table class='settings'><tbody>{rows}</tbody></table>"


def figure_html(caption: str, path: Optional[Path]) -> str:
    """A figure embedded as data, or where it would have been, why it is missing."""
    if path is None:
        return f"<p class='bad'>Figure missing: {_e(caption)}</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{_e(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def lede(meta: dict, answer: Optional[Answer]) -> str:
    seeds = len(meta.get("settings", {}).get("seeds", []))
    budget = answer.budget if answer is not None else ""
    return (f"<p class='lede'>{_e(meta.get('description', ''))}. Every configuration trained "
            f"{_e(budget)}, {seeds} seed{'s' if seeds != 1 else ''} each; the skill is the validation "
            f"{_e(meta.get('metric_name'))} ({'higher' if meta.get('higher_is_better') else 'lower'} is better) at "
            "the end.</p>")


def write_html(out: Path, meta: dict, rows: Sequence[Row], images: Sequence[tuple[str, Optional[Path]]],
               answer: Optional[Answer] = None, title: Optional[str] = None) -> Path:
    """``out/report.html``: the answer, the front, the tables, every figure (embedded) and the settings."""
    title = title or f"{meta.get('task', '')}: which TBPTT(k1, k2)?"
    strategies = len({r["strategy"] for r in rows})
    figures = list(images)
    front = [f for f in figures if f[1] is not None and Path(f[1]).name == "front.png"]
    rest = [f for f in figures if f not in front]
    interrupted = "<p class='bad'>Interrupted: only the runs that finished are shown.</p>" if meta.get("interrupted") else ""
    body = (f"<h1>{_e(title)}</h1>{lede(meta, answer)}{interrupted}{card_html(answer, strategies)}"
            "<h2>Pareto front: skill against CPU time</h2><p>The configurations no other beats on both: none "
            "reached as good a validation metric with less CPU time. Read it as the answer at a smaller budget: "
            "with a CPU budget in a stretch, use the configuration that holds it.</p>"
            f"{front_html(answer, meta)}{''.join(figure_html(c, p) for c, p in front)}"
            f"<h2>Skill, stability and speed</h2>{tables_html(rows, meta, answer.choice if answer else None)}"
            f"<h2>Curves</h2>{''.join(figure_html(c, p) for c, p in rest)}"
            f"<h2>Settings</h2>{settings_html(meta)}"
            "<p class='small'>Data: results.json (everything), results.csv (one row per configuration), runs.csv "
            "(one row per run: its CPU time, updates, forward and backward steps) and the PNGs, in this folder.</p>")
    path = out / "report.html"
    atomic_write_text(path, _page(title, body))
    return path


def write_index(out: Path, title: str, intro: str, parts: Sequence[dict]) -> Path:
    """``out/index.html``: one page with several comparisons' answers and front plots, each linking
    to its full report. ``parts``: dicts with ``name``, ``note``, ``answer``, ``meta``, ``report``
    (the report's path) and ``front`` (the front PNG's path, or None)."""
    sections = []
    for part in parts:
        meta = part["meta"]
        link = html.escape(str(Path(part["report"]).relative_to(out))) if part.get("report") else ""
        figure = figure_html(FIGURES["front.png"], part.get("front")) if part.get("front") else ""
        sections.append(
            f"<h2>{_e(part['name'])}</h2><p class='lede'>{_e(part.get('note', ''))}</p>"
            f"{card_html(part.get('answer'))}<h3>Pareto front: skill against CPU time</h3>"
            f"{front_html(part.get('answer'), meta)}{figure}"
            + (f"<p><a href='{link}'>The full report: tables of skill, stability and speed, every curve, the "
               f"gradient norms and the settings</a></p>" if link else ""))
    body = f"<h1>{_e(title)}</h1><p class='lede'>{_e(intro)}</p>{''.join(sections)}"
    path = out / "index.html"
    atomic_write_text(path, _page(title, body))
    return path

