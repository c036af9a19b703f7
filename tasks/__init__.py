"""Built-in tasks, suites and sequences.

Registered on import: every YAML under ``tasks/defs`` and ``tasks/slim_mds`` (tasks), ``tasks/suites`` (named
general suites) and ``tasks/sequences`` (sequences), plus the Python-built task packages ``tasks.olora`` (the
O-LoRA benchmark, orders 1-6) and ``tasks.trace`` (TRACE).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmark.errors import UserError
from tasks.base import SEQUENCES, SUITES, TASKS, GeneralSuite, SequenceSpec, TaskSpec, register_suite, register_task

__all__ = ["SEQUENCES", "SUITES", "TASKS", "GeneralSuite", "SequenceSpec", "TaskSpec", "load_suite_yaml",
           "load_task_dir", "register_suite", "register_task", "resolve_suite"]

_HERE = Path(__file__).parent


def load_task_yaml(path: Path) -> TaskSpec:
    """Read one task YAML (safe_load); relative data paths resolve against the YAML's folder.

    A bad file (unknown or removed key such as ``chance``, invalid value) raises a one-line :class:`UserError`
    naming the file, not a traceback.
    """
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise UserError(f"task file {str(path)!r}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    try:
        return TaskSpec(**raw, root=str(path.parent.resolve())) if "root" not in raw else TaskSpec(**raw)
    except (TypeError, ValueError) as exc:  # TaskSpec's own checks, and unknown keys (TypeError)
        raise UserError(f"task file {str(path)!r}: {exc}") from exc


def load_sequence_yaml(path: Path) -> SequenceSpec:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw.setdefault("name", path.stem)
    return SequenceSpec(**raw)


def load_suite_yaml(path: Path) -> GeneralSuite:
    """Read one suite YAML; ``include_path`` resolves against the YAML's folder."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"suite file {str(path)!r}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    raw.setdefault("root", str(Path(path).parent.resolve()))
    return GeneralSuite(**raw)


def resolve_suite(name_or_path: str) -> GeneralSuite:
    """A general suite by registered name (``ls suites``) or from a suite YAML file."""
    p = Path(name_or_path).expanduser()
    if name_or_path.endswith((".yaml", ".yml")) or p.is_file():
        if not p.is_file():
            raise UserError(f"general suite file not found: {name_or_path!r}")
        try:
            return load_suite_yaml(p)
        except (TypeError, ValueError, yaml.YAMLError) as exc:
            raise UserError(f"invalid general suite {name_or_path!r}: {exc}") from exc
    return SUITES.get(name_or_path)


def load_task_dir(directory: Path, origin: str) -> list[str]:
    """Register every ``*.yaml`` task in ``directory`` (and sequences in ``directory/sequences``)."""
    names = []
    for p in sorted(Path(directory).glob("*.yaml")):
        spec = load_task_yaml(p)
        TASKS.register(spec.name, spec, origin=origin)
        names.append(spec.name)
    for p in sorted((Path(directory) / "sequences").glob("*.yaml")):
        seq = load_sequence_yaml(p)
        SEQUENCES.register(seq.name, seq, origin=origin)
    return names


for _dir in ("defs", "slim_mds"):
    for _p in sorted((_HERE / _dir).glob("*.yaml")):
        _spec = load_task_yaml(_p)
        TASKS.register(_spec.name, _spec, origin=f"builtin:tasks/{_dir}/{_p.name}")
for _p in sorted((_HERE / "suites").glob("*.yaml")):
    _suite = load_suite_yaml(_p)
    SUITES.register(_suite.name, _suite, origin=f"builtin:tasks/suites/{_p.name}")

from tasks import olora as _olora, trace as _trace  # noqa: E402  (register their tasks; suites must exist first)

for _mod in (_olora, _trace):
    for _seq in _mod.sequences():
        SEQUENCES.register(_seq.name, _seq, origin=f"builtin:{_mod.__name__}")
for _p in sorted((_HERE / "sequences").glob("*.yaml")):
    _seq = load_sequence_yaml(_p)
    SEQUENCES.register(_seq.name, _seq, origin=f"builtin:tasks/sequences/{_p.name}")
