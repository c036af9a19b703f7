"""``python -m benchmark prepare``: fetch everything a run needs into one folder, for machines with no network.

On a machine with network::

    python -m benchmark prepare --sequence olora-order1 --general slim --cache /shared/fb-data [--model ID]

writes, under the cache folder:

- ``datasets/...jsonl``: every split of every downstream and local general task, the selected rows in their
  upstream schema (hub datasets and TRACE-style local folders alike);
- ``hf-datasets/``: the ``datasets`` cache holding lm-eval's own tasks (e.g. MMLU), as lm-eval downloaded them;
- ``models/<id>/``: the model snapshot, when ``--model`` names a hub model (a built-in model, e.g.
  ``smollm2-135m``, is converted into the model cache instead, where ``run --model smollm2-135m`` finds it);
- ``manifest.json``: dataset ids, configs, requested and resolved revisions, sampling rules, row counts and the
  sha256 of each file; lm-eval task names and versions; model ids and paths. Preparing several sequences into
  one folder merges their entries.

Then, on the air-gapped machine, ``python -m benchmark run ... --data-dir /shared/fb-data`` (or
``FORGETBENCH_DATA=/shared/fb-data``) reads only from that folder; ``HF_DATASETS_OFFLINE=1`` is set by ``run``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from benchmark.builtin_models import ensure_builtin, is_builtin
from benchmark.errors import UserError
from benchmark.evaluate import all_included
from benchmark.models import model_slug
from benchmark.records import atomic_write_text, read_json
from tasks import SEQUENCES, TASKS, resolve_suite
from tasks.sources import data_root, fetch_upstream, prepared_path, root_env, sample_rule, write_jsonl

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def configure_data_env(data_dir: str | None, roots: dict[str, str] | None = None) -> Path:
    """Point this process (and any it starts) at a prepared folder; call before ``datasets`` is imported.

    Sets ``FORGETBENCH_DATA``, ``HF_DATASETS_CACHE`` (when the folder holds lm-eval datasets and the user has
    not set it) and ``FORGETBENCH_<ROOT>_DIR`` for each local dataset root (e.g. ``trace``).
    """
    if data_dir:
        os.environ["FORGETBENCH_DATA"] = str(Path(data_dir).expanduser().resolve())
    root = data_root()
    if (root / "hf-datasets").is_dir():
        os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    for name, folder in (roots or {}).items():
        p = Path(folder).expanduser()
        if not p.is_dir():
            raise UserError(f"invalid data_roots.{name}: {folder!r} is not a directory")
        os.environ[root_env(name)] = str(p.resolve())
    return root


def resolve_revision(path: str, revision: str | None) -> str | None:
    """The commit SHA a hub dataset revision points to now (None offline or for a local dataset)."""
    try:
        # deferred: huggingface_hub reads HF_* variables at import, which configure_data_env may set
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().dataset_info(path, revision=revision).sha
    except Exception as exc:  # a revision we cannot resolve is recorded as unknown, never guessed
        logger.warning("could not resolve the revision of %s@%s: %s", path, revision, exc)
        return None


def download_lm_eval_tasks(names: list[str], include_path: str | None) -> dict[str, Any]:
    """Build lm-eval's tasks once (which downloads their datasets into the ``datasets`` cache)."""
    from lm_eval.tasks import TaskManager, get_task_dict  # deferred: imports `datasets`, after configure_data_env

    manager = TaskManager(include_path=include_path, verbosity="ERROR",
                          include_defaults=not all_included(names, include_path))
    tasks = get_task_dict(names, manager)
    out: dict[str, Any] = {}

    def walk(d: Any) -> None:
        for key, val in d.items():
            if isinstance(val, dict):
                walk(val)
            else:
                cfg = getattr(val, "config", None)
                out[getattr(cfg, "task", str(key))] = {
                    "dataset_path": getattr(cfg, "dataset_path", None),
                    "dataset_name": getattr(cfg, "dataset_name", None),
                    "version": (getattr(cfg, "metadata", None) or {}).get("version")}

    walk(tasks)
    return out


def download_model(model_id: str, revision: str | None, target: Path) -> str:
    """Snapshot a hub model into ``target`` (then pass ``--model <target>``)."""
    from huggingface_hub import snapshot_download  # deferred: see resolve_revision

    return snapshot_download(model_id, revision=revision, local_dir=str(target))


def _task_specs(names: list[str]) -> list[Any]:
    """Specs of ``names`` plus the components of mixed tasks (each once, in order)."""
    out: list[Any] = []
    for n in names:
        spec = TASKS.get(n)
        if spec.source is not None and spec.source["type"] == "mix":
            out += [s for s in _task_specs(spec.source["tasks"]) if s not in out]
        if spec not in out:
            out.append(spec)
    return out


def _prepare_task(spec: Any, root: Path) -> list[dict[str, Any]]:
    """Materialise every split of one task; returns its manifest entries."""
    entries = []
    if spec.source is None:  # packaged data (e.g. tiny-world): record what it is, nothing to fetch
        for split in spec.splits:
            p = spec.path(split)
            entries.append({"task": spec.name, "split": split, "type": "packaged", "file": str(p),
                            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
        return entries
    if spec.source["type"] == "mix":
        return [{"task": spec.name, "type": "mix", "components": list(spec.source["tasks"])}]
    src = spec.source
    resolved = resolve_revision(src["path"], src.get("revision")) if src["type"] == "hf" else None
    for split in spec.splits:
        rows = fetch_upstream(spec, split)
        path = prepared_path(spec, split, root)
        sha = write_jsonl(path, rows)
        entries.append({"task": spec.name, "split": split, "type": src["type"], "dataset": src["path"],
                        "config": src.get("name"), "root": src.get("root"), "revision": src.get("revision"),
                        "resolved_revision": resolved, "upstream_split": src["splits"][split],
                        "sample": sample_rule(spec, split), "file": str(path.relative_to(root)), "rows": len(rows),
                        "sha256": sha})
        logger.info("prepared %s/%s: %d rows -> %s", spec.name, split, len(rows), path.relative_to(root))
    spec._cache.clear()  # re-read from the prepared copy from now on
    return entries


def prepare(sequence: str, general: str | None = None, cache: str | None = None, model: str | None = None,
            model_revision: str | None = None) -> dict[str, Any]:
    """Materialise the data (and optionally the model) of one sequence + suite; returns the merged manifest."""
    root = configure_data_env(cache)
    root.mkdir(parents=True, exist_ok=True)
    seq = SEQUENCES.get(sequence)
    suite = resolve_suite(general) if general else seq.general
    builtin = [t.split(":", 1)[1] for t in suite.tasks if t.startswith("lm_eval:")]
    local = [t for t in suite.tasks if not t.startswith("lm_eval:")]
    path = root / MANIFEST
    manifest: dict[str, Any] = read_json(path) if path.is_file() else {}
    manifest.setdefault("datasets", {})
    manifest.setdefault("lm_eval_tasks", {})
    manifest.setdefault("models", {})
    manifest.setdefault("prepared", [])
    for spec in _task_specs(list(seq.tasks) + local):
        for e in _prepare_task(spec, root):
            manifest["datasets"][f"{e['task']}/{e.get('split', '*')}"] = e
    if builtin:
        logger.info("downloading lm-eval tasks %s into %s", ", ".join(builtin), os.environ.get("HF_DATASETS_CACHE"))
        manifest["lm_eval_tasks"].update(download_lm_eval_tasks(builtin, suite.include_dir()))
    if model:
        if is_builtin(model):  # kept in the model cache, where `run --model <name>` looks
            manifest["models"][model] = {"path": str(ensure_builtin(model)), "builtin": True}
        else:
            target = root / "models" / model_slug(model)
            manifest["models"][model] = {"path": download_model(model, model_revision, target),
                                         "revision": model_revision}
    import lm_eval  # deferred: imports `datasets`, after configure_data_env

    manifest["prepared"].append({"sequence": seq.name, "general": suite.name or general, "lm_eval_tasks": builtin,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "lm_eval_version": getattr(lm_eval, "__version__", None)})
    manifest["data_root"] = str(data_root())
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
