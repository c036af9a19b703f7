"""Run records: one typed :class:`RunRecord` per (method, seed) run, stored as one JSON file; every write atomic.

A record is built by the stage loop (:mod:`benchmark.stages`), written to ``DIR/runs/<run_id>.json`` and read back
by the leaderboard; no other file reads it by string keys. :meth:`RunRecord.from_dict` reads every schema version
written so far (missing fields take their defaults, unknown ones are kept in ``extra`` and written back), and
:meth:`RunRecord.to_dict` writes the same JSON as before the type existed. Bump :data:`SCHEMA_VERSION` whenever a
field changes meaning, is added or is removed (and the CSV columns of :mod:`benchmark.tables` with it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1.5"  # 1.1: ``variant`` column in runs.csv and leaderboard.csv; 1.2: ``base_model_hash``;
# 1.3: ``precision`` (the resolved train.precision policy); 1.4: per-sample files ``samples/`` named by
# ``base_samples`` and ``stages[].samples``; 1.5: measured floors ``general_floor`` (replaces ``general_chance``)
# and ``task_floors`` in run records, metric ``plasticity_floor_margin``
KINDS = ("method", "reference")  # ``kind`` is written only for a reference run: absent = method
_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def git_info() -> dict[str, Any]:
    """Commit SHA and whether the work tree is dirty (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def environment() -> dict[str, Any]:
    """Package versions and machine facts that can change a number."""
    import torch  # deferred: the leaderboard reads records without loading torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "tokenizers", "numpy",
                "forgetbench"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            # CPU kernels are chosen by instruction set (AVX2, AVX512, ...): their float sums can differ
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


# -- the typed record -------------------------------------------------------------------------------------
OMIT = {"omit": True}  # field metadata: left out of the JSON while it holds its default (as older records did)


def _from_mapping(cls: type, data: dict[str, Any], nested: dict[str, Any]) -> Any:
    """``cls(**known fields)`` with the unknown keys in ``extra``; ``nested`` maps a field to its reader."""
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: (nested[k](v) if k in nested else v) for k, v in data.items() if k in names}
    return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def _to_mapping(obj: Any) -> dict[str, Any]:
    """The JSON object of a record dataclass: fields in order, ``OMIT`` fields only when set, then ``extra``."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if f.metadata.get("omit") and value == default:
            continue
        if isinstance(value, list):
            value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        elif isinstance(value, dict):
            value = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in value.items()}
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
    return {**out, **obj.extra}


@dataclass
class StageRow:
    """One trained stage of a run: what it trained on, its cost, its loss, and the trained model's content key."""

    # defaults only so that a partial or hand-made record still reads (the stage loop sets every one)
    stage: int | None = None
    task: str | None = None  # the task trained on (``joint`` for the pooled stage of a joint reference)
    steps: int | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    final_loss: float | None = None
    tokens: int | None = None
    model_key: str | None = field(default=None, metadata=OMIT)  # content hash of the model after this stage
    rank_model_keys: list[str] | None = field(default=None, metadata=OMIT)  # one per process: equal iff in sync
    samples: str | None = field(default=None, metadata=OMIT)  # per-sample file (eval.log_samples), relative
    # [step, loss] per optimiser step (mean of consecutive steps past 1000 points: benchmark.train.downsample);
    # the loss includes the method's aux loss, which aux_loss_curve holds alone for a method that has one
    loss_curve: list[list[float]] | None = field(default=None, metadata=OMIT)
    aux_loss_curve: list[list[float]] | None = field(default=None, metadata=OMIT)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRow:
        return _from_mapping(cls, data, {})

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass
class Costs:
    """What a run spent: parameter counts (:meth:`methods.base.Method.param_counts`), seconds and peak memory."""

    trainable_params: int | None = field(default=None, metadata=OMIT)
    active_params: int | None = field(default=None, metadata=OMIT)
    train_seconds: float | None = field(default=None, metadata=OMIT)
    eval_seconds: float | None = field(default=None, metadata=OMIT)
    wall_seconds: float | None = field(default=None, metadata=OMIT)
    peak_memory_mb: float | None = field(default=None, metadata=OMIT)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Costs:
        return _from_mapping(cls, data, {})

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass
class ExtraSuite:
    """Scores of a run's kept weights on a general suite it was not run with (``python -m benchmark evaluate``).

    ``G[n]`` is the suite's row after stage ``stages[n]`` (stage 0: the base model), in the order of ``tasks``;
    only stages whose weights were kept are there. ``suite_id`` is ``name@hash`` over the tasks' content, as a
    ``sequence_id``: scores of another version of the suite replace these.
    """

    suite_id: str | None = None
    tasks: list[str] = field(default_factory=list)
    floor: list[float | None] = field(default_factory=list)  # measured floor of each task (None: unknown)
    metric_names: dict[str, str] = field(default_factory=dict)
    stages: list[int] = field(default_factory=list)
    G: list[list[float | None]] = field(default_factory=list)
    model_keys: list[str | None] = field(default_factory=list)  # the model scored at each of ``stages``
    n_examples: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtraSuite:
        return _from_mapping(cls, data, {})

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


def _extra_suites(value: Any) -> dict[str, ExtraSuite]:
    return {k: ExtraSuite.from_dict(v) for k, v in (value or {}).items() if isinstance(v, dict)}


def _stage_rows(value: Any) -> list[StageRow]:
    return [StageRow.from_dict(s) for s in value or [] if isinstance(s, dict)]


def _costs(value: Any) -> Costs | None:
    return Costs.from_dict(value) if isinstance(value, dict) else None


@dataclass
class RunRecord:
    """Everything one run measured, and what its numbers depend on (``DIR/runs/<run_id>.json``).

    ``R[t][i]`` is downstream task i after stage t and ``G[t][j]`` general benchmark j (row 0: the base model);
    see docs/metrics.md. ``status`` is ``running`` while the stages go on (the copy inside a checkpoint), then
    ``success`` or ``failed`` (with ``error``, ``traceback`` and the ``failed_stage``, 0 = before stage 1).
    """

    run_id: str
    schema_version: str = SCHEMA_VERSION
    method: str | None = None
    model: str | None = None
    model_source: Any = None
    sequence: str | None = None
    sequence_id: str | None = None
    seed: int | None = None
    status: str = "running"
    error: str | None = None
    failed_stage: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    method_config: dict[str, Any] = field(default_factory=dict)
    precision: str | None = field(default=None, metadata=OMIT)  # records before 1.3 lack it
    tasks: list[str] = field(default_factory=list)
    general_tasks: list[str] = field(default_factory=list)
    general_floor: list[float | None] | None = field(default=None, metadata=OMIT)  # 1.5; older: general_chance
    task_floors: list[float | None] | None = field(default=None, metadata=OMIT)  # 1.5
    metric_names: dict[str, str] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)
    R: list[list[float | None]] = field(default_factory=list)
    G: list[list[float | None]] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    base_model_hash: str | None = field(default=None, metadata=OMIT)
    n_examples: dict[str, int] | None = field(default=None, metadata=OMIT)
    base_samples: str | None = field(default=None, metadata=OMIT)  # per-sample file of the stage-0 evaluation
    costs: Costs | None = field(default=None, metadata=OMIT)
    lr: float | None = field(default=None, metadata=OMIT)  # the effective learning rate (train.lr_scale applied)
    adapted_modules: list[str] | None = field(default=None, metadata=OMIT)
    kind: str = field(default="method", metadata=OMIT)  # one of KINDS
    traceback: str | None = field(default=None, metadata=OMIT)
    kept_weights: list[int] | None = field(default=None, metadata=OMIT)  # stages under weights/<run_id>/
    extra_general: dict[str, ExtraSuite] = field(default_factory=dict, metadata=OMIT)  # suite name -> scores
    extra: dict[str, Any] = field(default_factory=dict)  # fields of other versions, written back unchanged

    NESTED: ClassVar[dict[str, Any]] = {"stages": _stage_rows, "costs": _costs, "extra_general": _extra_suites}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Read a record of any schema version; raises ``ValueError`` on something that is not a run record."""
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or not data["run_id"]:
            raise ValueError("not a run record (no run_id)")
        return _from_mapping(cls, data, cls.NESTED)

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


# -- what a run's numbers depend on -----------------------------------------------------------------------
def result_inputs(config: dict[str, Any], method: str, method_config: dict[str, Any], sequence_id: str,
                  seed: int, precision: str | None) -> dict[str, Any]:
    """The settings a run's numbers depend on (not where it is written, nor which other runs share the sweep).

    Used to refuse resuming, or skipping as done, a run whose settings changed since its checkpoint or record.
    ``precision`` is the resolved policy (``train.precision: auto`` means different things on a CPU and a GPU),
    so it replaces the configured value. The thread count is checked separately (``checkpoint.thread_mismatch``).
    """
    train, ev = config.get("train"), config.get("eval")
    if isinstance(train, dict):
        # sharding "none" is how every record before the option was made: absent and "none" are the same run
        train = {k: v for k, v in train.items() if k != "precision" and not (k == "sharding" and v == "none")}
    if isinstance(ev, dict):  # per-sample logging changes no number (and records before 1.4 lack the key)
        ev = {k: v for k, v in ev.items() if k != "log_samples"}
    return {"model": config.get("model"), "train": train, "eval": ev, "precision": precision,
            "sequence_id": sequence_id, "method": method, "method_config": method_config, "seed": seed}


def record_precision(rec: RunRecord) -> str | None:
    """The precision policy a run record was made with.

    Records before schema 1.3 do not name it: on a CPU they were fp32 throughout; on a GPU the methods' dtypes
    differed (the reason for the policy), so such a record matches no policy (None).
    """
    if rec.precision is not None:
        return rec.precision
    return "fp32" if rec.env.get("device") == "cpu" else None


def record_inputs(rec: RunRecord) -> dict[str, Any]:
    """:func:`result_inputs` of a finished record."""
    return result_inputs(rec.config, rec.method, rec.method_config, rec.sequence_id, rec.seed, record_precision(rec))


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """``"train.lr: 0.001 -> 0.5"`` for the first differing leaf of two nested dicts, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            d = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if d:
                return d
        return None
    # JSON round trips turn tuples into lists and may turn 1.0 into 1: compare as JSON
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
        return f"{path or 'value'}: {old!r} -> {new!r}"
    return None


def read_record(path: str | Path) -> RunRecord | None:
    """The run record in ``path``; None when the file is missing, unreadable or not a run record."""
    try:
        return RunRecord.from_dict(read_json(path))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def finished_result(path: str | Path, inputs: dict[str, Any]) -> tuple[RunRecord | None, str | None]:
    """(the successful record in ``path`` or None, how its inputs differ from ``inputs`` or None if the same).

    The one check of "is this run already done with the same settings": the runner skips such a run, and
    validation refuses a finished run made with other settings unless ``--force``.
    """
    rec = read_record(path)
    if rec is None or rec.status != "success" or not rec.config:
        return None, None
    return rec, first_difference(record_inputs(rec), inputs)


def write_record(path: str | Path, rec: RunRecord) -> None:
    write_json(path, rec.to_dict())


def load_records(dirs: list[str | Path]) -> list[RunRecord]:
    """All run records under ``DIR/runs/*.json`` of each directory, de-duplicated by run id (first wins).

    A run id seen twice with different content (e.g. the same run repeated on two machines) keeps the first
    directory's record and logs a warning, so merging never silently averages a run in twice.
    """
    seen: dict[str, RunRecord] = {}
    source: dict[str, str] = {}
    for d in dirs:
        for p in sorted(Path(d, "runs").glob("*.json")):
            try:
                data = read_json(p)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("skipping unreadable run record %s", p)
                continue  # a foreign or damaged file never breaks a leaderboard
            try:
                rec = RunRecord.from_dict(data)
            except ValueError:
                logger.warning("skipping %s: not a run record (no run_id)", p)
                continue
            if rec.run_id not in seen:
                seen[rec.run_id], source[rec.run_id] = rec, str(d)
            elif seen[rec.run_id] != rec:
                logger.warning("run %s appears twice with different content; keeping the one from %s, not %s",
                               rec.run_id, source[rec.run_id], d)
    return list(seen.values())


def _number_or_none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def general_floor(rec: RunRecord) -> list[float]:
    """Floor f_j (points) of each general benchmark of a run record, for the normalised general metrics.

    ``general_floor`` (schema 1.5), else ``general_chance`` (the declared chance of older records), else zeros.
    An unknown floor (None: an lm-eval built-in task) counts as 0, as the 0.0 older records stored for them did.
    """
    values = rec.general_floor if rec.general_floor is not None else rec.extra.get("general_chance")
    if not values:
        return [0.0] * len(rec.general_tasks)
    return [0.0 if (v := _number_or_none(x)) is None else v for x in values]


def task_floors(rec: RunRecord) -> list[float | None]:
    """Floor f_i (points) of each downstream task of a run record; None where unknown (records before 1.5)."""
    if rec.task_floors is None:
        return [None] * len(rec.tasks)
    return [_number_or_none(x) for x in rec.task_floors]
