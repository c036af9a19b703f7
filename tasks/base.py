"""Task and sequence specifications.

A task is a train split, a test split, a prompt format (Jinja, the same templates lm-eval renders), a metric
and a ``kind`` (``knowledge`` or ``skill``; LoRAMoE's task types). Tasks are YAML files under ``tasks/defs/``
or objects registered from Python with :func:`register_task`; outside packages add either through the
``forgetbench.tasks`` entry-point group. A sequence is an ordered list of downstream tasks plus a general suite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.registry import Registry

TASKS: Registry[Any] = Registry("task", group="forgetbench.tasks", builtin_package="tasks")
SEQUENCES: Registry[Any] = Registry("sequence", group="forgetbench.sequences", builtin_package="tasks")

KINDS = ("knowledge", "skill")
GROUPS = ("downstream", "general")
OUTPUT_TYPES = ("generate_until", "multiple_choice")
METRICS = ("exact_match", "acc")
TRAIN_FORMATS = ("answer", "full")


@dataclass
class TaskSpec:
    """One task. Records are JSON lines; templates are Jinja over a record's fields.

    Args:
        name: registry name.
        kind: ``knowledge`` (new facts) or ``skill`` (a new ability); drives LoRAMoE task types.
        group: ``downstream`` (trained on, in the R matrix) or ``general`` (only evaluated, G matrix).
        output_type: ``generate_until`` (greedy generation, exact match) or ``multiple_choice`` (log-likelihood).
        prompt: Jinja template of the context (lm-eval ``doc_to_text``).
        target: Jinja template of the answer (``doc_to_target``); for multiple choice, the index of the gold choice.
        choices: record field holding the answer options (multiple choice only).
        target_delimiter: string between prompt and answer, in training and evaluation alike.
        train_format: ``answer`` = loss on the answer only; ``full`` = LM loss on the whole text (fact injection).
        metric: ``exact_match`` or ``acc``.
        data: split name -> JSONL path (relative paths are resolved against ``root``).
        train_steps: default optimiser steps for this task's stage.
        chance: chance score in points (for normalised general metrics).
        max_gen_toks: generation budget for ``generate_until``.
        until: strings that end a generation (e.g. ``"."`` for a fact sentence trained with its full stop).
    """

    name: str
    kind: str = "skill"
    group: str = "downstream"
    output_type: str = "generate_until"
    prompt: str = "{{prompt}}"
    target: str = "{{target}}"
    choices: str | None = None
    target_delimiter: str = " "
    train_format: str = "answer"
    metric: str = "exact_match"
    data: dict[str, str] = field(default_factory=dict)
    train_steps: int = 100
    chance: float = 0.0
    max_gen_toks: int = 16
    until: list[str] = field(default_factory=lambda: ["\n"])
    description: str = ""
    version: int = 1
    root: str = ""

    def __post_init__(self) -> None:
        for fname, value, valid in (
            ("kind", self.kind, KINDS),
            ("group", self.group, GROUPS),
            ("output_type", self.output_type, OUTPUT_TYPES),
            ("metric", self.metric, METRICS),
            ("train_format", self.train_format, TRAIN_FORMATS),
        ):
            if value not in valid:
                raise ValueError(f"task {self.name!r}: invalid {fname} {value!r}; valid: {', '.join(valid)}")
        if self.output_type == "multiple_choice" and not self.choices:
            raise ValueError(f"task {self.name!r}: multiple_choice needs 'choices'")
        if "test" not in self.data:
            raise ValueError(f"task {self.name!r}: data needs a 'test' split")
        if self.group == "downstream" and "train" not in self.data:
            raise ValueError(f"task {self.name!r}: a downstream task needs a 'train' split")
        if not isinstance(self.train_steps, int) or self.train_steps < 1:
            raise ValueError(f"task {self.name!r}: invalid train_steps {self.train_steps!r} (must be >= 1)")

    def path(self, split: str) -> Path:
        p = Path(self.data[split])
        return p if p.is_absolute() else (Path(self.root) / p).resolve()

    def records(self, split: str) -> list[dict[str, Any]]:
        """Load a split's records (JSON lines)."""
        with open(self.path(split), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def content_hash(self) -> str:
        """Hash of the spec (without its location) and of every data file's bytes."""
        h = hashlib.sha256()
        spec = {k: v for k, v in self.__dict__.items() if k not in ("root", "data")}
        h.update(json.dumps(spec, sort_keys=True).encode())
        for split in sorted(self.data):
            h.update(split.encode())
            h.update(self.path(split).read_bytes())
        return h.hexdigest()


@dataclass
class GeneralSuite:
    """The general-knowledge suite: local task names, or lm-eval task names prefixed with ``lm_eval:``."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None


@dataclass
class SequenceSpec:
    """A named, ordered list of downstream tasks plus the general suite; steps may be overridden per task."""

    name: str
    tasks: list[str]
    general: GeneralSuite = field(default_factory=GeneralSuite)
    steps: dict[str, int] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.general, dict):
            self.general = GeneralSuite(**self.general)
        if not self.tasks:
            raise ValueError(f"sequence {self.name!r} has no tasks")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Register a :class:`TaskSpec` built in Python (YAML files under ``tasks/defs`` register themselves)."""
    TASKS.register(spec.name, spec, origin=f"builtin:{spec.root or 'python'}")
    return spec
