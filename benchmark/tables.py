"""Tidy tables of run records: one row per measured score (``scores.csv``; ``extra_scores.csv`` for re-scored
suites) and per diagnostic (``routing.csv``).

The columns of these CSVs are declared here (``*_COLUMNS``) and documented in ``results/README.md``; bump
:data:`benchmark.records.SCHEMA_VERSION` whenever a column changes meaning, is added or is removed.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import pandas as pd

from benchmark.records import SCHEMA_VERSION, RunRecord

SCORE_COLUMNS = ["schema_version", "run_id", "kind", "method", "model", "sequence", "sequence_id", "seed", "status",
                 "stage", "stage_task", "task", "task_group", "metric", "value", "n_examples", "eval_batch_size"]
# scores of kept weights on suites the runs were not made with (records' extra_general; ``evaluate``)
EXTRA_COLUMNS = (SCORE_COLUMNS[:SCORE_COLUMNS.index("task")] + ["suite", "suite_id"]
                 + [c for c in SCORE_COLUMNS[SCORE_COLUMNS.index("task"):] if c != "task_group"])
ROUTING_COLUMNS = ["schema_version", "run_id", "kind", "method", "model", "sequence_id", "seed", "stage",
                   "diagnostic", "value"]
SCORE_INTS, SCORE_FLOATS = ["seed", "stage", "n_examples"], ["value"]
# configured values that are a count, a fraction or a word (eval.batch_size "auto", eval.limit 0.1): kept as given
SCORE_SETTINGS = ["eval_batch_size"]
ROUTING_INTS, ROUTING_FLOATS = ["seed", "stage"], ["value"]


def typed_frame(rows: list[dict[str, Any]] | pd.DataFrame, columns: list[str], ints: list[str] = (),
                floats: list[str] = (), settings: list[str] = ()) -> pd.DataFrame:
    """A table with exactly ``columns``, integer columns as nullable ints and float columns as floats.

    Fixing the types makes a cell's text independent of the other rows (``55`` is written ``55.0`` in a float
    column whatever else is merged in, and an integer column with a gap does not turn into ``10.0``). ``settings``
    columns hold a configured value as it was given: a whole number as an int, a fraction as a float, a word such
    as ``auto`` as text (see :func:`setting_value`).
    """
    df = pd.DataFrame(rows, columns=columns) if not isinstance(rows, pd.DataFrame) else rows[columns].copy()
    for c in ints:
        df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    for c in floats:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in settings:
        df[c] = pd.Series([setting_value(v) for v in df[c]], index=df.index, dtype=object)
    return df


def setting_value(x: Any) -> int | float | str | None:
    """A configured value as a plain Python value: 16 (also from 16.0), 0.1, "auto", or None when missing."""
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, str):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return int(x) if float(x).is_integer() else float(x)
    return str(x)


def smallest_setting(values: list[Any]) -> int | float | str | None:
    """The smallest number among ``values`` (missing ones ignored), else the first word (``auto``), else None."""
    present = [v for v in map(setting_value, values) if v is not None]
    nums = [v for v in present if not isinstance(v, str)]
    return min(nums) if nums else (sorted(present)[0] if present else None)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def method_variants(records: list[RunRecord]) -> dict[str, str]:
    """run id -> what sets its method configuration apart from other runs of that method (``""`` if nothing).

    Runs of one method, model and sequence made with different method options (an ablation, or folders merged
    from machines with other settings) must never be averaged together: the variant names the option values that
    differ within the group (``ranks=uniform5``), and the leaderboard keeps one row per variant.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.kind, r.method, r.model, r.sequence_id), []).append(r)
    out: dict[str, str] = {}
    for recs in groups.values():
        cfgs = [r.method_config if isinstance(r.method_config, dict) else {} for r in recs]
        keys = sorted({k for c in cfgs for k in c})
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
        for r, c in zip(recs, cfgs):
            out[r.run_id] = ",".join(f"{k}={_short(c.get(k))}" for k in differ)
    return out


def display_name(method: Any, variant: Any) -> str:
    """``method`` or ``method [variant]`` for tables and plot legends."""
    return f"{method} [{variant}]" if isinstance(variant, str) and variant else str(method)


def _stage_names(rec: RunRecord) -> list[str]:
    """``base`` then what each stage trained on (the task, or ``joint`` for a joint reference)."""
    names = {s.stage: s.task for s in rec.stages}
    tasks = rec.tasks
    n = max(len(rec.R), len(rec.G))
    return ["base"] + [names.get(t) or (tasks[t - 1] if t - 1 < len(tasks) else str(t)) for t in range(1, n)]


def _identity(rec: RunRecord) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "run_id": rec.run_id, "kind": rec.kind, "method": rec.method,
            "model": rec.model, "sequence": rec.sequence, "sequence_id": rec.sequence_id, "seed": rec.seed}


def score_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """Tidy rows (one per stage x task) of one run record: every measured cell of R and G."""
    rows = []
    tasks, general = rec.tasks, rec.general_tasks
    order = _stage_names(rec)
    n_ex = rec.n_examples or {}
    ident = _identity(rec)
    batch = (rec.config.get("eval") or {}).get("batch_size")
    for group, names, matrix in (("downstream", tasks, rec.R), ("general", general, rec.G)):
        for stage, row in enumerate(matrix):
            for name, value in zip(names, row):
                rows.append({**ident, "status": rec.status, "stage": stage, "stage_task": order[stage],
                             "task": name, "task_group": group,
                             "metric": rec.metric_names.get(name, "score"), "value": value,
                             "n_examples": n_ex.get(name), "eval_batch_size": batch})
    return rows


def extra_score_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """Tidy rows (one per suite x stage x task) of the re-scored suites of one run record (``extra_general``)."""
    rows = []
    order, ident = _stage_names(rec), _identity(rec)
    batch = (rec.config.get("eval") or {}).get("batch_size")
    for name, suite in rec.extra_general.items():
        for stage, row in zip(suite.stages, suite.G):
            for task, value in zip(suite.tasks, row):
                rows.append({**ident, "status": rec.status, "stage": stage,
                             "stage_task": order[stage] if stage < len(order) else str(stage), "suite": name,
                             "suite_id": suite.suite_id, "task": task, "metric": suite.metric_names.get(task, "score"),
                             "value": value, "n_examples": suite.n_examples.get(task), "eval_batch_size": batch})
    return rows


def flatten(value: Any, prefix: str) -> list[tuple[str, float]]:
    """Numeric leaves of a diagnostics value: ``a.b`` for mappings, ``a[i]`` for lists; other leaves dropped."""
    if isinstance(value, bool):
        return [(prefix, float(value))]
    if isinstance(value, (int, float)):
        return [] if math.isnan(value) else [(prefix, float(value))]
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, (list, tuple)):
        return [kv for i, v in enumerate(value) for kv in flatten(v, f"{prefix}[{i}]")]
    return []  # None (not measured), strings: not a number to tabulate


def routing_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """Tidy rows (one per stage x numeric diagnostic) of ``rec.diagnostics``; none for methods without any."""
    ident = {k: v for k, v in _identity(rec).items() if k in ROUTING_COLUMNS}
    rows = []
    for entry in rec.diagnostics:
        if not isinstance(entry, dict):
            continue
        stage = entry.get("stage")
        for name, value in flatten({k: v for k, v in entry.items() if k != "stage"}, ""):
            rows.append({**ident, "stage": stage, "diagnostic": name, "value": value})
    return rows
