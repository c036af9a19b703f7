"""Where task records come from when a task has a ``source``: Hugging Face datasets or local JSON folders.

Records stay in their upstream schema (the templates read the upstream fields), so the same spec works on the
hub dataset, on ``prepare``'s offline copy and on a test fixture. Three places are tried, in this order:

1. for ``type: local`` sources, the live folder named by ``FORGETBENCH_<ROOT>_DIR`` (e.g. ``FORGETBENCH_TRACE_DIR``);
2. the prepared copy under the data root (``$FORGETBENCH_DATA``, default ``~/.cache/forgetbench/data``), written by
   ``python -m benchmark prepare`` with a manifest of ids, revisions and sha256 sums;
3. nothing else: a run never downloads. A missing copy is a one-line error naming the ``prepare`` command.

Sampling (``sample: {train: {per_class: 1000, label: label, seed: 0}}``) picks upstream rows deterministically
(per class: a seeded shuffle of that class's row indices, first ``k`` kept, then sorted back into upstream order),
so ``prepare`` on one machine and a run on another agree row for row.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmark.errors import UserError
from benchmark.paths import cache_root
from tasks.templates import choice_list, render

logger = logging.getLogger(__name__)
SOURCE_TYPES = ("hf", "local", "mix")
SAMPLE_KEYS = {"per_class", "label", "seed", "max_rows"}


def data_root() -> Path:
    """Folder of prepared datasets: ``$FORGETBENCH_DATA`` or ``<cache>/data``."""
    env = os.environ.get("FORGETBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return cache_root() / "data"


def root_env(root: str) -> str:
    """Environment variable naming a local source root, e.g. ``trace`` -> ``FORGETBENCH_TRACE_DIR``."""
    return f"FORGETBENCH_{re.sub(r'[^A-Za-z0-9]', '_', root).upper()}_DIR"


def validate_source(spec: Any) -> None:
    """Check a spec's ``source`` mapping; raises ValueError naming the task and the bad key."""
    src = spec.source
    if not isinstance(src, dict):
        raise ValueError(f"task {spec.name!r}: source must be a mapping, got {src!r}")
    kind = src.get("type")
    if kind not in SOURCE_TYPES:
        raise ValueError(f"task {spec.name!r}: invalid source type {kind!r}; valid: {', '.join(SOURCE_TYPES)}")
    if kind == "mix":
        if not isinstance(src.get("tasks"), list) or len(src["tasks"]) < 2:
            raise ValueError(f"task {spec.name!r}: a mix source needs 'tasks', a list of at least 2 task names")
        if spec.output_type != "multiple_choice":
            raise ValueError(f"task {spec.name!r}: a mix source is multiple choice (query/choices/gold records)")
    elif not src.get("path"):
        raise ValueError(f"task {spec.name!r}: source needs a 'path'")
    if kind == "local" and not src.get("root"):
        raise ValueError(f"task {spec.name!r}: a local source needs a 'root' name (e.g. trace)")
    splits = src.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"task {spec.name!r}: source needs 'splits', e.g. {{train: train, test: test}}")
    for split, rule in (src.get("sample") or {}).items():
        if split not in splits:
            raise ValueError(f"task {spec.name!r}: sample names unknown split {split!r}")
        if rule is not None and (not isinstance(rule, dict) or set(rule) - SAMPLE_KEYS):
            raise ValueError(f"task {spec.name!r}: invalid sample rule {rule!r}; keys: {sorted(SAMPLE_KEYS)}")
        if rule and "per_class" in rule and "label" not in rule:
            raise ValueError(f"task {spec.name!r}: per_class sampling needs 'label' (the class field)")


def sample_rule(spec: Any, split: str) -> dict[str, Any] | None:
    return ((spec.source or {}).get("sample") or {}).get(split)


def select_rows(labels: list[Any] | None, n_rows: int, rule: dict[str, Any] | None) -> list[int]:
    """Deterministic row selection: ``per_class`` rows of each class and/or at most ``max_rows`` rows."""
    idx = list(range(n_rows))
    if not rule:
        return idx
    rng = random.Random(rule.get("seed", 0))
    if rule.get("per_class") is not None:
        by_class: dict[str, list[int]] = {}
        for i, lab in enumerate(labels or []):
            by_class.setdefault(json.dumps(lab), []).append(i)
        idx = []
        for key in sorted(by_class):
            rows = by_class[key]
            rng.shuffle(rows)
            idx += rows[: rule["per_class"]]
        idx.sort()
    if rule.get("max_rows") is not None and len(idx) > rule["max_rows"]:
        idx = sorted(rng.sample(idx, rule["max_rows"]))
    return idx


def source_key(spec: Any, split: str) -> dict[str, Any]:
    """What identifies a materialised split: the upstream dataset, split, revision and sampling rule."""
    src = spec.source
    return {"type": src["type"], "path": src["path"], "name": src.get("name"), "revision": src.get("revision"),
            "root": src.get("root"), "split": src["splits"][split], "sample": sample_rule(spec, split)}


def prepared_path(spec: Any, split: str, root: Path | None = None) -> Path:
    """Where ``prepare`` writes (and runs read) one split of one source."""
    key = source_key(spec, split)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key['path']}--{key['name'] or 'default'}")
    split_slug = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key["split"]))
    return (root or data_root()) / "datasets" / key["type"] / slug / f"{split_slug}-{digest}.jsonl"


def hub_load(path: str, name: str | None, split: str, revision: str | None) -> Any:
    """Download one split of a hub dataset (``prepare`` only; tests replace this with a fixture reader)."""
    import datasets  # deferred on purpose: a heavy import that only ``prepare`` needs

    return datasets.load_dataset(path, name, split=split, revision=revision)


def read_local_split(spec: Any, split: str, folder: Path) -> list[dict[str, Any]]:
    """A local split file: a JSON array (TRACE's format) or JSON lines."""
    p = folder / spec.source["path"] / spec.source["splits"][split]
    if not p.is_file():
        raise UserError(f"task {spec.name!r}: {split} file not found: {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise UserError(f"task {spec.name!r}: {str(p)!r} is not a JSON array of records")
    return data


def fetch_upstream(spec: Any, split: str) -> list[dict[str, Any]]:
    """The selected upstream rows of one split, from the hub (hf) or the live local folder (local)."""
    src, rule = spec.source, sample_rule(spec, split)
    if src["type"] == "local":
        folder = os.environ.get(root_env(src["root"]))
        if not folder:
            raise UserError(f"task {spec.name!r}: set {root_env(src['root'])} (or data_roots.{src['root']}) to the "
                            f"folder holding {src['path']}/")
        rows = read_local_split(spec, split, Path(folder).expanduser())
        labels = [r.get(rule["label"]) for r in rows] if rule and rule.get("label") else None
        return [rows[i] for i in select_rows(labels, len(rows), rule)]
    ds = hub_load(src["path"], src.get("name"), src["splits"][split], src.get("revision"))
    labels = list(ds[rule["label"]]) if rule and rule.get("label") else None
    return ds.select(select_rows(labels, len(ds), rule)).to_list()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write rows as JSON lines via a temporary file + rename (never half a file); returns the sha256."""
    data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()


def upstream_records(spec: Any, split: str) -> list[dict[str, Any]]:
    """Upstream-schema rows of one split: live local folder, else the prepared copy, else a one-line error."""
    src = spec.source
    if src["type"] == "local" and os.environ.get(root_env(src["root"])):
        return fetch_upstream(spec, split)
    path = prepared_path(spec, split)
    if not path.is_file():
        hint = f" or set {root_env(src['root'])}" if src["type"] == "local" else ""
        raise UserError(f"task {spec.name!r}: {split} data of {src['path']!r} is not prepared in "
                        f"{str(data_root())!r}; "
                        f"run `python -m benchmark prepare --sequence <name>` where the data is reachable{hint} "
                        f"(or point --data-dir / FORGETBENCH_DATA at a prepared folder)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _preprocess_fn(spec: Any):
    mod, _, fn = spec.preprocess.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"task {spec.name!r}: cannot import preprocess {spec.preprocess!r}: {exc}") from exc


def mix_records(spec: Any, split: str, get_task: Callable[[str], Any]) -> list[dict[str, Any]]:
    """A mixture of multiple-choice tasks in one schema: ``{query, choices, gold, source}`` per record.

    Each component (``get_task(name)``, the task registry's lookup) is rendered with its own templates (so the
    mixture trains and scores exactly what each task would), capped at ``sample.<split>.max_rows`` rows per
    component, and interleaved by a seeded shuffle.
    """
    rule = sample_rule(spec, split) or {}
    rows: list[dict[str, Any]] = []
    for name in spec.source["tasks"]:
        comp = get_task(name)
        if comp.output_type != "multiple_choice":
            raise UserError(f"task {spec.name!r}: mixed task {name!r} is not multiple choice")
        comp_split = spec.source["splits"][split]
        recs = comp.records(comp_split)
        keep = select_rows(None, len(recs), {"max_rows": rule.get("max_rows"), "seed": rule.get("seed", 0)})
        for r in (recs[i] for i in keep):
            rows.append({"query": render(comp.prompt, r), "choices": choice_list(comp, r),
                         "gold": int(render(comp.target, r).strip()), "source": name})
    random.Random(rule.get("seed", 0)).shuffle(rows)
    return rows


def load_records(spec: Any, split: str, get_task: Callable[[str], Any]) -> list[dict[str, Any]]:
    """Records of one split as the templates see them: upstream rows, then the optional ``preprocess`` hook.

    ``get_task`` looks up a mix source's component tasks by name (the caller's registry: this module sits below
    :mod:`tasks.base` and does not import it).
    """
    if spec.source is not None and spec.source["type"] == "mix":
        rows = mix_records(spec, split, get_task)
    elif spec.source is not None:
        rows = upstream_records(spec, split)
    else:
        with open(spec.path(split), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if spec.preprocess:
        fn = _preprocess_fn(spec)
        rows = [r for r in (fn(dict(row), **spec.preprocess_args) for row in rows) if r is not None]
    if not rows:
        raise UserError(f"task {spec.name!r}: the {split} split is empty")
    return rows
