"""The leaderboard: run records -> per-run metrics -> one row per (method, model, sequence), mean +- std.

Always rebuilt from ``runs/*.json`` alone (no model needed), so several result folders can be merged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark import metrics
from benchmark.records import SCHEMA_VERSION, SCORE_COLUMNS, atomic_write_text, load_records, score_rows

logger = logging.getLogger(__name__)
HEADLINE = ["final_avg", "avg_incremental", "plasticity", "bwt", "forgetting", "fwt", "general_base",
            "general_final", "general_delta", "general_delta_norm", "general_retention", "general_worst_delta"]
COST = ["trainable_params", "active_params", "train_seconds", "peak_memory_mb"]
KEYS = ["method", "model", "sequence", "sequence_id"]


def run_metrics(rec: dict[str, Any]) -> dict[str, Any]:
    """Every metric of one finished run (value or None), plus the reasons for undefined ones."""
    out: dict[str, Any] = {k: rec.get(k) for k in KEYS + ["run_id", "seed", "status"]}
    if rec.get("status") != "success" or not rec.get("R"):
        return out
    chance = rec.get("general_chance") or [0.0] * len(rec.get("general_tasks", []))
    G = rec.get("G") if rec.get("general_tasks") else [[] for _ in rec["R"]]
    for name, mv in metrics.compute_all(rec["R"], G, chance).items():
        out[name] = mv.value
        if mv.value is None:
            out[f"{name}_reason"] = mv.reason
    costs = rec.get("costs", {})
    for k in COST:
        out[k] = costs.get(k)
    return out


def build(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (method, model, sequence id): means over successful seeds, ``_std`` columns, Pareto flag."""
    per_run = [run_metrics(r) for r in records]
    rows = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in per_run:
        groups.setdefault(tuple(r.get(k) for k in KEYS), []).append(r)
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        ok = [r for r in runs if r.get("status") == "success"]
        row: dict[str, Any] = dict(zip(KEYS, key))
        row.update(schema_version=SCHEMA_VERSION, n_seeds=len(ok), n_failed=len(runs) - len(ok),
                   seeds=",".join(str(r["seed"]) for r in sorted(ok, key=lambda r: r["seed"])))
        for m in HEADLINE + COST:
            agg = metrics.aggregate([r.get(m) for r in ok])
            row[m] = agg["mean"]
            row[f"{m}_std"] = agg["std"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["pareto"] = False
    for _, idx in df.groupby(["model", "sequence_id"], dropna=False).groups.items():
        sub = df.loc[idx]
        flags = metrics.pareto_front(list(zip(sub["final_avg"], sub["general_delta"])))
        df.loc[idx, "pareto"] = flags
    return df.sort_values(["model", "sequence", "final_avg"], ascending=[True, True, False]).reset_index(drop=True)


def _fmt(mean: Any, std: Any, digits: int = 1) -> str:
    if mean is None or pd.isna(mean):
        return "n/a"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std is not None and not pd.isna(std) else "")


def to_markdown(df: pd.DataFrame) -> str:
    """The human table: trade-off first (final_avg vs general_delta), Pareto-optimal rows marked with *."""
    if df.empty:
        return "No finished runs.\n"
    cols = ["final_avg", "plasticity", "bwt", "forgetting", "general_base", "general_final", "general_delta"]
    lines = []
    for (model, seq), sub in df.groupby(["model", "sequence_id"], sort=False):
        lines += [f"### {model} on {seq}", "",
                  "| method | seeds | " + " | ".join(cols) + " | trainable | active | train s |",
                  "|---" * (len(cols) + 5) + "|"]
        for _, r in sub.iterrows():
            name = f"**{r['method']}** *" if r["pareto"] else r["method"]
            cells = [_fmt(r[c], r.get(f"{c}_std")) for c in cols]
            tp = f"{int(r['trainable_params']):,}" if pd.notna(r["trainable_params"]) else "n/a"
            ap = f"{int(r['active_params']):,}" if pd.notna(r["active_params"]) else "n/a"
            failed = f" ({int(r['n_failed'])} failed)" if r["n_failed"] else ""
            lines.append(f"| {name} | {r['n_seeds']}{failed} | " + " | ".join(cells)
                         + f" | {tp} | {ap} | {_fmt(r['train_seconds'], None, 0)} |")
        lines.append("")
    lines.append("`*` = on the Pareto front of (final_avg ↑, general_delta ↑). Scores in points (0-100); "
                 "mean ± std over seeds. Definitions: results/README.md.")
    return "\n".join(lines) + "\n"


def write_all(out_dir: str | Path, result_dirs: list[str | Path] | None = None, plots: bool = True) -> pd.DataFrame:
    """(Re)write ``scores.csv``, ``leaderboard.csv``, ``leaderboard.md`` (and plots) under ``out_dir``."""
    out_dir = Path(out_dir)
    records = load_records(result_dirs or [out_dir])
    scores = pd.DataFrame([row for r in records for row in score_rows(r)], columns=SCORE_COLUMNS)
    atomic_write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    df = build(records)
    atomic_write_text(out_dir / "leaderboard.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "leaderboard.md", to_markdown(df))
    if plots and not df.empty:
        try:
            from benchmark import plots as plotting

            plotting.write_plots(out_dir, records, df)
        except ImportError:
            logger.debug("plots module not available")
    return df
