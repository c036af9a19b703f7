"""Built-in tasks and sequences: every YAML under ``tasks/defs`` and ``tasks/sequences`` is registered."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.base import SEQUENCES, TASKS, GeneralSuite, SequenceSpec, TaskSpec, register_task

__all__ = ["SEQUENCES", "TASKS", "GeneralSuite", "SequenceSpec", "TaskSpec", "load_task_dir", "register_task"]

_HERE = Path(__file__).parent


def load_task_yaml(path: Path) -> TaskSpec:
    """Read one task YAML (safe_load); relative data paths resolve against the YAML's folder."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw.setdefault("name", path.stem)
    return TaskSpec(**raw, root=str(path.parent.resolve())) if "root" not in raw else TaskSpec(**raw)


def load_sequence_yaml(path: Path) -> SequenceSpec:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw.setdefault("name", path.stem)
    return SequenceSpec(**raw)


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


for _p in sorted((_HERE / "defs").glob("*.yaml")):
    _spec = load_task_yaml(_p)
    TASKS.register(_spec.name, _spec, origin=f"builtin:tasks/defs/{_p.name}")
for _p in sorted((_HERE / "sequences").glob("*.yaml")):
    _seq = load_sequence_yaml(_p)
    SEQUENCES.register(_seq.name, _seq, origin=f"builtin:tasks/sequences/{_p.name}")
