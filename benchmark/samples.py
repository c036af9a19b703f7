"""Per-sample evaluation records: what the model answered, not only how often it was right.

A score of 0 on a sentiment task can mean the model forgot the skill or that it now answers in another format
(a country name after a city-facts stage). With ``eval.log_samples`` on, every evaluation also writes one
compact row per (task, document, filter) built from lm-eval's logged samples:

- all rows: ``task``, ``doc_id``, ``filter`` (lm-eval's filter name), ``prompt`` (the context string the model
  saw: ``arguments[0][0]``), ``target`` (an index for multiple choice), ``metrics`` (metric -> value);
- generation: ``generation`` (the raw greedy output) and ``answer`` (after the task's filters: what was scored);
- multiple choice: ``choices`` (each continuation as scored), ``loglikelihoods``, ``is_greedy`` and ``chosen``
  (the index of the largest log-likelihood, as lm-eval's ``acc`` picks it);
- other log-likelihood requests (built-in ``loglikelihood`` / ``loglikelihood_rolling`` tasks):
  ``loglikelihoods`` (and ``is_greedy`` where lm-eval returns it).

Rows are written as gzip-compressed JSON lines under ``DIR/samples/``, named by the evaluation's cache key
(:func:`benchmark.evalcache.eval_key`): a cached evaluation shared by several runs (the base model's stage 0)
has one samples file, written once. Samples never change a score, so the setting is not part of that key.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.errors import UserError
from benchmark.paths import under
from benchmark.records import atomic_write_bytes

LOG_SAMPLES = ("local", "all", "none")  # eval.log_samples: the harness's own task specs, also lm-eval's, nothing
SAMPLES_DIR = "samples"
SUFFIX = ".jsonl.gz"
ALL_SUFFIX = ".all.jsonl.gz"  # also holds the samples of lm-eval's built-in tasks (eval.log_samples: all)


def check_log_samples(value: Any) -> None:
    """Validate an ``eval.log_samples`` value."""

    if value not in LOG_SAMPLES:
        raise UserError(f"invalid eval.log_samples: {value!r}; valid: {', '.join(LOG_SAMPLES)}")


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars as Python numbers, tuples as lists, anything else unknown as text."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def sample_row(task: str, output_type: str, sample: dict[str, Any]) -> dict[str, Any]:
    """The compact row of one lm-eval logged sample (see the module docstring)."""
    args = sample.get("arguments") or [[""]]
    row: dict[str, Any] = {"task": task, "doc_id": sample.get("doc_id"), "filter": sample.get("filter"),
                           "prompt": args[0][0] if args and args[0] else "", "target": _plain(sample.get("target"))}
    resps, filtered = sample.get("resps") or [], sample.get("filtered_resps") or []
    if output_type == "generate_until":
        raw = resps[0] if resps else []
        # one response per request unless a task asks for repeats: keep the string, not a list of one
        row["generation"] = raw[0] if isinstance(raw, list) and len(raw) == 1 else _plain(raw)
        row["answer"] = _plain(filtered[0]) if filtered else None
    else:
        lls, greedy = [], []
        for r in filtered:
            if isinstance(r, (list, tuple)):
                lls.append(float(r[0]))
                greedy.append(bool(r[1]) if len(r) > 1 else None)
            else:
                lls.append(float(r))
        if output_type == "multiple_choice":
            row["choices"] = [a[1] if len(a) > 1 else None for a in args]
        row["loglikelihoods"] = lls
        if greedy:
            row["is_greedy"] = greedy
        if output_type == "multiple_choice":
            # numpy's argmax: the first of tied maxima, as lm-eval's acc picks it
            row["chosen"] = int(np.argmax(lls)) if lls else None
    row["metrics"] = {m: _plain(sample.get(m)) for m in sample.get("metrics") or []}
    return row


def sample_rows(task: str, output_type: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compact rows of one task's logged samples, ordered by document then filter (independent of batching)."""
    rows = [sample_row(task, output_type, s) for s in samples]
    return sorted(rows, key=lambda r: (r["doc_id"] if isinstance(r["doc_id"], int) else -1, str(r["filter"])))


def samples_dir(out_dir: str | Path) -> Path:
    """``DIR/samples/``."""
    return under(out_dir, SAMPLES_DIR)


def samples_candidates(out_dir: str | Path, key: str, builtin: bool) -> list[Path]:
    """Files that can serve the samples of evaluation ``key``, the one to write first.

    ``builtin``: lm-eval's own tasks are wanted too (``all`` with built-in tasks in the suite): only a file
    holding them will do. Otherwise a file of either scope holds every local task's samples.
    """
    d = samples_dir(out_dir)
    if builtin:
        return [d / f"{key}{ALL_SUFFIX}"]
    return [d / f"{key}{SUFFIX}", d / f"{key}{ALL_SUFFIX}"]


def write_samples(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as gzip-compressed JSON lines, atomically; byte-identical for identical rows (no gzip mtime)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as f:
        f.write(text.encode("utf-8"))
    atomic_write_bytes(path, buf.getvalue())


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a samples file (see :func:`write_samples`)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
