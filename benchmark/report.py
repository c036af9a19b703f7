"""``report.html``: one self-contained page to share (inline CSS and JS, plots embedded as base64 data URIs).

The leaderboard table shows the headline columns (:data:`HEADLINE`) first; every other column is in the table
too but hidden until the "more columns" button is pressed (``#columns=all`` in the URL opens them on load). It
sorts on a click on a column header (``#sort=<column>:<asc|desc>`` in the URL sorts on load, which makes the
sorting testable in a headless browser); each header's tooltip is the column's definition. Every cell keeps the
exact CSV value in ``data-value``, so the table can be read back and checked.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark import metrics
from benchmark.records import SCHEMA_VERSION, atomic_write_text
from benchmark.tables import display_name

# what a reader compares first: the trade-off (downstream score vs. general forgetting) and its two causes
HEADLINE = ["method", "final_avg", "general_delta", "plasticity", "forgetting"]
TEXT_COLUMNS = ["method", "variant", "kind", "model", "sequence_id", "seeds"]
COLUMN_HELP = {
    "method": "fine-tuning method (registry name)",
    "variant": "method options that differ between runs of this method (empty: all runs share one configuration)",
    "kind": "method = continual run over the sequence; reference = joint training on all tasks (upper bound)",
    "model": "base model (tiny-world, a hub id or a local path)",
    "sequence_id": "sequence name @ content hash of its ordered tasks, steps, data files and general suite; "
                   "rows are comparable only when this matches",
    "seeds": "seeds of the successful runs averaged in this row",
    "n_seeds": "number of successful runs (seeds) averaged",
    "n_failed": "runs of this row that did not finish successfully (not averaged)",
    "pareto": "on the Pareto front of (final_avg higher, general_delta higher) within the model and sequence, "
              "with seed noise: dominated only when another row is better by more than one std on both axes",
    "modules": "adapted modules: all (full fine-tuning), attn, mlp, attn+mlp, or the module names",
    "lr": "the effective learning rate (the method's lr or train.lr, times train.lr_scale)",
    "trainable_params": "trainable parameters (count, mean over seeds)",
    "active_params": "parameters used per token (count; below trainable for sparse mixtures)",
    "train_seconds": "training time summed over stages (seconds, mean over seeds)",
    "peak_memory_mb": "peak memory (MiB): GPU allocated, or process RSS on a CPU",
    "n_examples": "evaluation examples per evaluation pass, all tasks together",
    "eval_batch_size": "evaluation batch size (scores can depend on it)",
}
COST_COLUMNS = ["modules", "lr", "trainable_params", "active_params", "train_seconds", "peak_memory_mb", "n_examples",
                "eval_batch_size"]
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
h1{margin-bottom:.2em} .meta{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right;white-space:nowrap}
td.text,th.text{text-align:left}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0;text-decoration:underline dotted}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.pareto td:first-child{font-weight:bold} tr.reference{font-style:italic;background:#fafafa}
td.na{color:#999} .scroll{overflow-x:auto} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top} figcaption{font-size:.85em;color:#555}
table.collapsed .more{display:none} th.headline{background:#e6eef7}
button.more-toggle{font:inherit;font-size:.85em;padding:.25em .8em;cursor:pointer}
"""
JS = """
function sortTable(table, col, dir) {
  const ths = Array.from(table.tHead.rows[0].cells);
  const th = ths.find(h => h.dataset.col === col);
  if (!th) return;
  const idx = ths.indexOf(th), num = th.dataset.type === 'num', body = table.tBodies[0];
  const rows = Array.from(body.rows).map((r, i) => [r, r.cells[idx].dataset.value, i]);
  rows.sort((a, b) => {
    const ea = a[1] === '', eb = b[1] === '';
    if (ea || eb) return ea === eb ? a[2] - b[2] : (ea ? 1 : -1);  // empty (undefined) cells always last
    const c = num ? parseFloat(a[1]) - parseFloat(b[1]) : a[1].localeCompare(b[1]);
    return (dir === 'desc' ? -c : c) || a[2] - b[2];
  });
  rows.forEach(r => body.appendChild(r[0]));
  ths.forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', dir === 'desc' ? 'descending' : 'ascending');
}
function showColumns(button, all) {
  const table = document.getElementById(button.getAttribute('aria-controls'));
  table.classList.toggle('collapsed', !all);
  button.setAttribute('aria-expanded', all ? 'true' : 'false');
  button.textContent = all ? button.dataset.less : button.dataset.more;
}
document.addEventListener('DOMContentLoaded', () => {
  document.querySelectorAll('button.more-toggle').forEach(b => {
    b.addEventListener('click', () => showColumns(b, b.getAttribute('aria-expanded') !== 'true'));
    if (/columns=all/.test(location.hash)) showColumns(b, true);
  });
  document.querySelectorAll('table.sortable').forEach(table => {
    Array.from(table.tHead.rows[0].cells).forEach(th => th.addEventListener('click', () => {
      sortTable(table, th.dataset.col, th.getAttribute('aria-sort') === 'descending' ? 'asc' : 'desc');
    }));
  });
  const m = /sort=([^:&]+)(?::(asc|desc))?/.exec(decodeURIComponent(location.hash));
  if (m) document.querySelectorAll('table.sortable').forEach(t => sortTable(t, m[1], m[2] || 'desc'));
});
"""


def _value(x: Any) -> str:
    """The exact CSV text of a cell (``repr`` of a float round-trips), empty when missing."""
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (float, np.floating)):
        return repr(float(x))
    if isinstance(x, np.integer):
        return str(int(x))
    return str(x)


def _shown(col: str, row: pd.Series) -> str:
    """The human text of a cell (the exact value stays in ``data-value``)."""
    v = row[col]
    if _value(v) == "":
        return "" if col in TEXT_COLUMNS else "n/a"
    if col == "pareto":
        return "yes" if bool(v) else ""
    if col in metrics.METRICS:
        std = row.get(f"{col}_std")
        digits = 3 if "retention" in col else 1
        return f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if _value(std) else "")
    if col in ("train_seconds", "peak_memory_mb", "trainable_params", "active_params"):
        return f"{float(v):,.0f}"
    return str(v)


def _help(col: str) -> str:
    if col in metrics.METRICS:
        _, higher, definition = metrics.METRICS[col]
        return f"{col} = {definition} ({'higher' if higher else 'lower'} is better; points unless a ratio; " \
               f"mean ± std over seeds, n/a = undefined, reason in leaderboard.csv)"
    return COLUMN_HELP.get(col, col)


def shown_columns(df: pd.DataFrame) -> list[str]:
    """The columns visible before "more columns": the headline, plus model and sequence when the table mixes
    several (rows of merged folders could not be told apart without them)."""
    mixed = len(df.groupby(["model", "sequence_id"], dropna=False)) > 1 if len(df) else False
    return HEADLINE + (["model", "sequence_id"] if mixed else [])


def table_columns(df: pd.DataFrame) -> list[str]:
    """Columns of the HTML table: the shown ones first, then identity, every other metric, costs."""
    rest = ["variant", "kind", "model", "sequence_id", "n_seeds", "seeds", "pareto", "n_failed"]
    first = shown_columns(df)
    return [c for c in first + [c for c in rest + list(metrics.METRICS) + COST_COLUMNS if c not in first]
            if c in df.columns]


def _classes(*names: str) -> str:
    return " ".join(n for n in names if n)


def leaderboard_table(df: pd.DataFrame, table_id: str = "leaderboard") -> str:
    """The sortable ``<table>``: headers carry ``title`` definitions, cells carry the exact CSV value."""
    cols = table_columns(df)
    shown = shown_columns(df)
    group = {c: "headline" if c in shown else "more" for c in cols}
    head = "".join(
        f'<th data-col="{c}" data-type="{"text" if c in TEXT_COLUMNS else "num"}" '
        f'class="{_classes("text" if c in TEXT_COLUMNS else "", group[c])}" title="{html.escape(_help(c))}">'
        f"{html.escape(c)}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cls = " ".join(x for x in ("pareto" if bool(r["pareto"]) else "", str(r["kind"])) if x)
        cells = []
        for c in cols:
            reason = r.get(f"{c}_reason") if c in metrics.METRICS else None
            tip = f' title="{html.escape(str(reason))}"' if _value(reason) else ""
            klass = "text" if c in TEXT_COLUMNS else ("na" if _value(r[c]) == "" else "")
            # the method cell names the variant too: with the variant column hidden, rows must stay distinct
            text = display_name(r["method"], r.get("variant")) if c == "method" else _shown(c, r)
            cells.append(f'<td data-col="{c}" data-value="{html.escape(_value(r[c]))}" '
                         f'class="{_classes(klass, "more" if group[c] == "more" else "")}"{tip}>'
                         f"{html.escape(text)}</td>")
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    n_more = sum(g == "more" for g in group.values())
    button = (f'<button type="button" class="more-toggle" aria-controls="{table_id}" aria-expanded="false" '
              f'data-more="more columns ({n_more})" data-less="fewer columns">more columns ({n_more})</button>')
    return (f'{button}<div class="scroll"><table id="{table_id}" class="sortable collapsed">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _img(caption: str, path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _runs_section(runs: pd.DataFrame) -> str:
    bad = runs[runs["status"] != "success"] if not runs.empty else runs
    if bad.empty:
        return f"<p>All {len(runs)} runs finished successfully.</p>"
    items = "".join(f"<li><code>{html.escape(str(r['run_id']))}</code>: {html.escape(str(r['status']))} "
                    f"{html.escape(_value(r['error']))}</li>" for _, r in bad.iterrows())
    return f"<p>{len(bad)} of {len(runs)} runs did not finish (not averaged):</p><ul>{items}</ul>"


def render(df: pd.DataFrame, runs: pd.DataFrame, images: dict[str, list[tuple[str, Path]]] | None = None) -> str:
    """The whole page as a string."""
    images = images or {}
    v = lambda r, c: _value(r[c]) or "?"  # noqa: E731
    versions = sorted({f"torch {v(r, 'version_torch')}, transformers {v(r, 'version_transformers')}, "
                       f"lm-eval {v(r, 'version_lm_eval')}, git {v(r, 'git_sha')[:10]}" for _, r in runs.iterrows()})
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>forgetbench leaderboard</title>", f"<style>{CSS}</style><script>{JS}</script></head><body>",
        "<h1>forgetbench leaderboard</h1>",
        f'<p class="meta">{len(runs)} run records, schema {SCHEMA_VERSION}, generated '
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
        f"{html.escape('; '.join(versions))}</p>",
        "<h2>Leaderboard</h2>",
        "<p>Scores in points (0-100), mean ± std over seeds. Click a column header to sort; hover a header for its "
        "definition and an n/a cell for why it is undefined. Bold rows are on the Pareto front of "
        "(final_avg, general_delta); italic rows are references, not continual methods. \"more columns\" shows "
        "the other metrics, the seeds, the costs and the evaluation settings.</p>",
        leaderboard_table(df) if not df.empty else "<p>No runs.</p>",
        _runs_section(runs),
    ]
    for key, title in (("tradeoff", "Downstream score vs. general forgetting"),
                       ("general", "General score along the sequence")):
        if images.get(key):
            parts += [f"<h2>{title}</h2>"] + [_img(c, p) for c, p in images[key]]
    if images.get("mean_heatmaps"):
        parts.append("<h2>R and G matrices per method (mean ± std over seeds)</h2>")
        parts += [_img(c, p) for c, p in images["mean_heatmaps"]]
    if images.get("heatmaps"):
        parts.append("<h2>R and G matrices per run</h2>")
        parts += [f"<details><summary>{html.escape(c)}</summary>{_img(c, p)}</details>" for c, p in images["heatmaps"]]
    if images.get("losses"):
        parts.append("<h2>Training loss per run</h2>")
        parts += [f"<details><summary>{html.escape(c)}</summary>{_img(c, p)}</details>" for c, p in images["losses"]]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: str | Path, df: pd.DataFrame, runs: pd.DataFrame,
                 images: dict[str, list[tuple[str, Path]]] | None = None) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path."""
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, render(df, runs, images))
    return path
