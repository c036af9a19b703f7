"""The leaderboard: run records -> per-run metrics (``runs.csv``) -> one row per method, model and sequence.

Always rebuilt from ``runs/*.json`` alone (no model needed), so several result folders can be merged. Columns are
declared here and documented in ``results/README.md``; an undefined metric is empty with a ``*_reason``, never 0.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark import metrics
from benchmark.metrics import MetricValue
from benchmark.records import SCHEMA_VERSION, RunRecord, atomic_write_text, general_floor, load_records, task_floors
from benchmark.tables import (EXTRA_COLUMNS, ROUTING_COLUMNS, ROUTING_FLOATS, ROUTING_INTS, SCORE_COLUMNS,
                              SCORE_FLOATS, SCORE_INTS, SCORE_SETTINGS, display_name, extra_score_rows,
                              method_variants, routing_rows, score_rows, smallest_setting, typed_frame)

logger = logging.getLogger(__name__)
METRIC_NAMES = list(metrics.METRICS)
COST = ["trainable_params", "active_params", "train_seconds", "peak_memory_mb"]
RUN_COST = ["trainable_params", "active_params", "train_seconds", "eval_seconds", "wall_seconds", "peak_memory_mb"]
# what a method may spend beside its parameter counts: the modules it adapts and its effective learning rate
BUDGET = ["adapted_modules", "lr"]
# Llama-style projection names shortened to a group in the ``modules`` column when all of the group is adapted
MODULE_GROUPS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
VERSION_PKGS = ["torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "forgetbench"]
KEYS = ["kind", "method", "variant", "model", "sequence", "sequence_id"]
ID_COLUMNS = ["schema_version", "run_id", "kind", "method", "variant", "model", "sequence", "sequence_id", "seed"]
RUN_COLUMNS = (ID_COLUMNS + ["status", "error", "n_tasks", "n_general", "n_stages_done"]
               + [c for m in METRIC_NAMES for c in (m, f"{m}_reason")] + ["reference_runs"] + RUN_COST[:2] + BUDGET
               + RUN_COST[2:]
               + ["train_steps", "n_examples", "eval_batch_size", "eval_limit", "num_threads", "device"]
               + [f"version_{p}" for p in VERSION_PKGS] + ["python", "git_sha", "git_dirty", "method_config"])
INT_RUN_COLUMNS = ["seed", "n_tasks", "n_general", "n_stages_done", "reference_runs", "trainable_params",
                   "active_params", "train_steps", "n_examples", "num_threads"]
# as configured: eval.batch_size may be "auto", eval.limit a fraction of each task's examples
SETTING_RUN_COLUMNS = ["eval_batch_size", "eval_limit"]
FLOAT_RUN_COLUMNS = METRIC_NAMES + [c for c in RUN_COST if c not in INT_RUN_COLUMNS] + ["lr"]
_COST_STD = [c for k in COST for c in (k, f"{k}_std")]
LEADERBOARD_COLUMNS = (["schema_version"] + KEYS + ["n_seeds", "n_failed", "seeds", "pareto"]
                       + [c for m in METRIC_NAMES for c in (m, f"{m}_std", f"{m}_n", f"{m}_reason")]
                       + _COST_STD[:4] + ["modules"] + BUDGET + _COST_STD[4:] + ["n_examples", "eval_batch_size"])
NO_REFERENCE = "no joint reference run for this model and sequence (run with --reference joint)"


def reference_scores(records: list[RunRecord]) -> dict[tuple, tuple[list[float], int]]:
    """(model, sequence_id) -> (per-task mean of the successful reference runs' final row, number of runs)."""
    rows: dict[tuple, list[list[float]]] = {}
    for r in records:
        if r.kind == "reference" and r.status == "success" and r.R:
            rows.setdefault((r.model, r.sequence_id), []).append(r.R[-1])
    out = {}
    for key, finals in rows.items():
        cols = list(zip(*finals))
        out[key] = ([metrics.aggregate(list(c))["mean"] if any(x is not None for x in c) else math.nan
                     for c in cols], len(finals))
    return out


def compact_modules(modules: Sequence[str]) -> str:
    """The short form of an adapted-module list: ``["all"]`` -> ``all``, the Llama projections -> ``attn+mlp``.

    A group (:data:`MODULE_GROUPS`) is named only when all of its modules are adapted; anything else is listed.
    """
    rest = sorted(set(modules))
    if rest == ["all"]:
        return "all"
    parts = []
    for group, names in MODULE_GROUPS.items():
        if set(names) <= set(rest):
            parts.append(group)
            rest = [m for m in rest if m not in names]
    return "+".join(parts + rest)


def _call(name: str, **inputs: Any) -> MetricValue:
    fn = metrics.METRICS[name][0]
    return fn(**{p: inputs[p] for p in inspect.signature(fn).parameters})


def _reference_metrics(R: list, G: list, floor: list) -> dict[str, MetricValue]:
    """A joint reference has one training stage: final_avg and the general metrics; no sequence metrics."""
    T = len(R[0])
    padded = [R[0]] + [[math.nan] * T] * (T - 1) + [R[-1]]  # final_avg reads rows 0 and T only
    why = MetricValue(None, "reference run (joint training on all tasks): there is no sequence of stages")
    out = {}
    for name in METRIC_NAMES:
        if name == "final_avg":
            out[name] = metrics.final_avg(padded)
        elif name.startswith("general_"):
            out[name] = _call(name, G=G, floor=floor)
        else:
            out[name] = why
    return out


def run_metrics(rec: RunRecord, references: dict[tuple, tuple[list[float], int]] | None = None
                ) -> dict[str, MetricValue]:
    """Every metric of :data:`metrics.METRICS` for one run record; undefined ones carry their reason."""
    if rec.status != "success" or not rec.R:
        why = f"run status is {rec.status!r}" + (f": {rec.error}" if rec.error else "")
        return {m: MetricValue(None, why) for m in METRIC_NAMES}
    floor = general_floor(rec)
    G = rec.G if rec.general_tasks else [[] for _ in rec.R]
    if rec.kind == "reference":
        return _reference_metrics(rec.R, G, floor)
    ref = (references or {}).get((rec.model, rec.sequence_id))
    out = metrics.compute_all(rec.R, G, floor, reference=ref[0] if ref else None, task_floors=task_floors(rec))
    if ref is None:
        out["intransigence"] = MetricValue(None, NO_REFERENCE)
    return out


def run_row(rec: RunRecord, references: dict[tuple, tuple[list[float], int]] | None = None,
            variant: str = "") -> dict[str, Any]:
    """One ``runs.csv`` row: identity, status, every metric with its reason, costs, evaluation facts, versions.

    ``variant``: what sets this run's method options apart from other runs of its method (see
    :func:`benchmark.tables.method_variants`).
    """
    row: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "run_id": rec.run_id, "kind": rec.kind,
                           "method": rec.method, "variant": variant, "model": rec.model, "sequence": rec.sequence,
                           "sequence_id": rec.sequence_id, "seed": rec.seed}
    stages = rec.stages
    row.update(status=rec.status, error=rec.error, n_tasks=len(rec.tasks), n_general=len(rec.general_tasks),
               n_stages_done=len(stages))
    for name, mv in run_metrics(rec, references).items():
        row[name], row[f"{name}_reason"] = mv.value, mv.reason
    ref = (references or {}).get((rec.model, rec.sequence_id))
    row["reference_runs"] = ref[1] if ref and rec.kind == "method" else 0
    row.update({k: getattr(rec.costs, k) if rec.costs else None for k in RUN_COST})
    modules = rec.adapted_modules  # absent in records before the budget columns: left empty
    row.update(adapted_modules=",".join(modules) if modules else None, lr=rec.lr)
    ev, env = rec.config.get("eval") or {}, rec.env
    n_ex = rec.n_examples or {}
    row.update(train_steps=sum(s.steps or 0 for s in stages) if stages else None,
               n_examples=sum(n_ex.values()) if n_ex else None, eval_batch_size=ev.get("batch_size"),
               eval_limit=ev.get("limit"), num_threads=env.get("torch_threads"), device=env.get("device"))
    row.update({f"version_{p}": (env.get("versions") or {}).get(p) for p in VERSION_PKGS})
    row.update(python=env.get("python"), git_sha=rec.git.get("sha"), git_dirty=rec.git.get("dirty"),
               method_config=json.dumps(rec.method_config or {}, sort_keys=True))
    return row


def runs_table(records: list[RunRecord]) -> pd.DataFrame:
    """``runs.csv``: one row per run (failed ones included), sorted by model, sequence, kind, method, seed."""
    refs, variants = reference_scores(records), method_variants(records)
    df = typed_frame([run_row(r, refs, variants.get(r.run_id, "")) for r in records], RUN_COLUMNS,
                     INT_RUN_COLUMNS, FLOAT_RUN_COLUMNS, SETTING_RUN_COLUMNS)
    df["variant"] = df["variant"].fillna("")
    return df.sort_values(["model", "sequence_id", "kind", "method", "variant", "seed"],
                          kind="stable").reset_index(drop=True)


def _reason(sub: pd.DataFrame, metric: str, n_ok: int, n_def: int) -> str | None:
    if n_ok == 0:
        return f"no successful run ({len(sub)} not successful)"
    if n_def == n_ok:
        return None
    reasons = "; ".join(sorted(set(sub.loc[sub[metric].isna(), f"{metric}_reason"].dropna().astype(str))))
    return reasons if n_def == 0 else f"{n_ok - n_def} of {n_ok} seeds undefined: {reasons}"


def _none(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA else x


def _same_over_seeds(values: Sequence[Any], what: str, key: tuple) -> Any:
    """The one value of a budget column over a row's runs; None when absent (old records) or when runs disagree."""
    vals = sorted({v for v in map(_none, values) if v is not None})
    if len(vals) > 1:
        logger.warning("%s: runs with different %s (%s) are averaged together; %s left empty",
                       "/".join(map(str, key)), what, vals, what)
    return vals[0] if len(vals) == 1 else None


# -- the trade-off front with seed noise (benchmark.metrics.noisy_pareto_front) ------------------------------
Point = metrics.Point


def _defined(x: Any) -> bool:
    return _none(x) is not None


def _front_inputs(sub: pd.DataFrame) -> tuple[list[Point], list[Point]]:
    return (list(zip(sub["final_avg"], sub["general_delta"])),
            list(zip(sub["final_avg_std"], sub["general_delta_std"])))


def within_noise(sub: pd.DataFrame) -> list[tuple[str, str]]:
    """The display names of the "within noise" pairs (better on both means first) among ``sub``'s method rows."""
    methods = sub[sub["kind"] == "method"]
    labels = [display_name(m, v) for m, v in zip(methods["method"], methods["variant"])]
    return [(labels[i], labels[k]) for i, k in metrics.noisy_pareto_front(*_front_inputs(methods))[1]]


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (kind, method, variant, model, sequence id): mean, std, n over successful seeds; Pareto flag."""
    rows = []
    for key, sub in runs.groupby(KEYS, dropna=False, sort=True):
        ok = sub[sub["status"] == "success"]
        row: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **dict(zip(KEYS, key))}
        row.update(n_seeds=len(ok), n_failed=len(sub) - len(ok), seeds=",".join(str(s) for s in sorted(ok["seed"])))
        for m in METRIC_NAMES:
            agg = metrics.aggregate([_none(v) for v in ok[m]])
            row.update({m: agg["mean"], f"{m}_std": agg["std"], f"{m}_n": agg["n"],
                        f"{m}_reason": _reason(ok if len(ok) else sub, m, len(ok), agg["n"])})
        for c in COST:
            agg = metrics.aggregate([_none(v) for v in ok[c]])
            row.update({c: agg["mean"], f"{c}_std": agg["std"]})
        for c in BUDGET:
            row[c] = _same_over_seeds(list(ok[c]), c, key)
        row["modules"] = compact_modules(row["adapted_modules"].split(",")) if row["adapted_modules"] else None
        for c in ("n_examples", "eval_batch_size"):  # equal over seeds unless settings changed; keep the smallest
            vals = [v for v in ok[c] if _none(v) is not None]
            row[c] = smallest_setting(vals)
            if len({str(v) for v in vals}) > 1:
                logger.warning("%s: runs with different %s (%s) are averaged together", "/".join(map(str, key)), c,
                               sorted({str(v) for v in vals}))
        rows.append(row)
    floats = [c for m in METRIC_NAMES + COST for c in (m, f"{m}_std")] + ["lr"]
    ints = ["n_seeds", "n_failed", "n_examples"] + [f"{m}_n" for m in METRIC_NAMES]
    df = typed_frame(rows, LEADERBOARD_COLUMNS, ints, floats, ["eval_batch_size"])
    if df.empty:
        return df
    df["pareto"] = False  # reference rows (upper bounds) never compete for the front
    for _, idx in df[df["kind"] == "method"].groupby(["model", "sequence_id"], dropna=False).groups.items():
        sub = df.loc[idx]
        df.loc[idx, "pareto"] = metrics.noisy_pareto_front(*_front_inputs(sub))[0]
    df["pareto"] = df["pareto"].astype(bool)
    df = df.sort_values(["model", "sequence_id", "kind", "final_avg", "method", "variant"],
                        ascending=[True, True, True, False, True, True], na_position="last", kind="stable")
    return df.reset_index(drop=True)


def build(records: list[RunRecord]) -> pd.DataFrame:
    """The leaderboard of a list of run records (see :func:`aggregate`)."""
    return aggregate(runs_table(records))


def _fmt(mean: Any, std: Any = None, digits: int = 1) -> str:
    if _none(mean) is None:
        return "n/a"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if _none(std) is not None else "")


MD_COLUMNS = ["final_avg", "plasticity", "bwt", "forgetting", "fwt", "general_delta", "general_delta_norm",
              "general_worst_delta", "intransigence"]


def to_markdown(df: pd.DataFrame) -> str:
    """The human table per (model, sequence): trade-off first, Pareto-optimal rows marked with *."""
    if df.empty:
        return "No runs.\n"
    lines = []
    for (model, seq), sub in df.groupby(["model", "sequence_id"], sort=False):
        cols = [c for c in MD_COLUMNS if c != "intransigence" or sub[c].notna().any()]
        base = sub["general_base"].dropna()
        lines += [f"### {model} on {seq}", "",
                  f"general_base (base model, before any training) = {_fmt(base.iloc[0]) if len(base) else 'n/a'}; "
                  f"evaluation batch size {smallest_setting(list(sub['eval_batch_size'])) or 'n/a'}, "
                  f"{_fmt(sub['n_examples'].dropna().min(), digits=0)} examples per evaluation.", "",
                  "| method | seeds | " + " | ".join(cols)
                  + " | trainable params | active params | modules | lr | train s |",
                  "|---" * (len(cols) + 7) + "|"]
        for _, r in sub.iterrows():
            label = display_name(r["method"], r["variant"])
            name = f"**{label}** *" if r["pareto"] else label
            if r["kind"] == "reference":
                name = f"_{label}_ (reference)"
            failed = f" ({int(r['n_failed'])} failed)" if r["n_failed"] else ""
            tp, ap = (f"{int(r[k]):,}" if _none(r[k]) is not None else "n/a"
                      for k in ("trainable_params", "active_params"))
            # records from before the budget columns have no modules or lr: empty, as the task says (not n/a)
            lr = f"{r['lr']:g}" if _none(r["lr"]) is not None else ""
            lines.append(f"| {name} | {r['n_seeds']}{failed} | " + " | ".join(_fmt(r[c], r[f"{c}_std"]) for c in cols)
                         + f" | {tp} | {ap} | {_none(r['modules']) or ''} | {lr} |"
                         f" {_fmt(r['train_seconds'], digits=0)} |")
        lines.append("")
        pairs = within_noise(sub)
        if pairs:
            lines += ["within noise: " + ", ".join(f"{a} ~ {b}" for a, b in pairs), ""]
    lines.append("`*` = on the Pareto front of (final_avg ↑, general_delta ↑) within a model and sequence: a row "
                 "is off it only when another is higher by more than one std over seeds on both axes. "
                 "\"within noise: A ~ B\" = A is better on both means, but not beyond that. "
                 "Scores in points (0-100), mean ± std over seeds; n/a = undefined (reason in leaderboard.csv). "
                 "modules: adapted modules (the exact list in leaderboard.csv), lr: effective learning rate. "
                 "Columns: results/README.md.")
    return "\n".join(lines) + "\n"


def write_all(out_dir: str | Path, result_dirs: list[str | Path] | None = None, plots: bool = True) -> pd.DataFrame:
    """(Re)write scores.csv, extra_scores.csv, runs.csv, routing.csv, leaderboard.csv/.md, plots and report.html
    under ``out_dir``."""
    out_dir = Path(out_dir)
    records = load_records(result_dirs or [out_dir])
    tables = {
        "scores.csv": typed_frame([row for r in records for row in score_rows(r)], SCORE_COLUMNS, SCORE_INTS,
                                  SCORE_FLOATS, SCORE_SETTINGS),
        "extra_scores.csv": typed_frame([row for r in records for row in extra_score_rows(r)], EXTRA_COLUMNS,
                                        SCORE_INTS, SCORE_FLOATS, SCORE_SETTINGS),
        "routing.csv": typed_frame([row for r in records for row in routing_rows(r)], ROUTING_COLUMNS, ROUTING_INTS,
                                   ROUTING_FLOATS),
        "runs.csv": runs_table(records),
    }
    df = aggregate(tables["runs.csv"])
    tables["leaderboard.csv"] = df
    for name, table in tables.items():
        atomic_write_text(out_dir / name, table.to_csv(index=False))
    atomic_write_text(out_dir / "leaderboard.md", to_markdown(df))
    images: dict[str, list[tuple[str, Path]]] = {}  # view -> (caption, PNG)
    if plots and records:
        from benchmark import plots as plotting  # deferred: matplotlib takes a second to import

        images = plotting.write_plots(out_dir, records, df)
    from benchmark import report  # deferred with the plots it embeds

    report.write_report(out_dir, df, tables["runs.csv"], images)
    return df
