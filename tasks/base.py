"""Task and sequence specifications.

A task is a train split, a test split, a prompt format (Jinja, the same templates lm-eval renders), a metric
and a ``kind`` (``knowledge`` or ``skill``; LoRAMoE's task types). Tasks are YAML files under ``tasks/defs/``
or objects registered from Python with :func:`register_task`; outside packages add either through the
``forgetbench.tasks`` entry-point group. A sequence is an ordered list of downstream tasks plus a general suite.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.registry import Registry
from tasks.sources import load_records, validate_source

TASKS: Registry[Any] = Registry("task", group="forgetbench.tasks", builtin_package="tasks")
SEQUENCES: Registry[Any] = Registry("sequence", group="forgetbench.sequences", builtin_package="tasks")
SUITES: Registry[Any] = Registry("suite", group="forgetbench.suites", builtin_package="tasks")

KINDS = ("knowledge", "skill")
GROUPS = ("downstream", "general")
OUTPUT_TYPES = ("generate_until", "multiple_choice")
METRICS = ("exact_match", "acc", "rouge_l", "edit_sim")
TRAIN_FORMATS = ("answer", "full")
_OPTIONAL_FIELDS = ("source", "preprocess", "preprocess_args", "eval_target", "answer_regex", "floor")


def _unset_optional(name: str, value: Any) -> bool:
    """An optional field left unset (left out of the content hash); a floor of 0.0 is set, only None is not."""
    return name in _OPTIONAL_FIELDS and (value is None if name == "floor" else not value)


# Removed fields: passing one fails with this advice instead of Python's "unexpected keyword argument".
_REMOVED_FIELDS = {"chance": "the floor is measured from the test split (tasks/floors.py); remove it"}


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
        metric: ``exact_match``, ``acc``, ``rouge_l`` (ROUGE-L F1) or ``edit_sim`` (character edit similarity).
        data: split name -> JSONL path (relative paths are resolved against ``root``).
        source: where the records come from instead of ``data``: a Hugging Face dataset in its upstream schema
            (``{type: hf, path, name, revision, splits: {train: ..., test: ...}, sample: ...}``) or local JSON
            files (``{type: local, root: trace, path: FOMC, splits: ...}``); see :mod:`tasks.sources`.
        preprocess: optional ``"module:function"`` mapping one upstream record to the fields the templates use
            (returns a dict, or None to drop the record); ``preprocess_args`` are passed as keyword arguments.
        eval_target: Jinja template of the reference at evaluation when it differs from the training target
            (e.g. TRACE ScienceQA trains on "Answer: B\nBecause ..." and scores the letter).
        answer_regex: regular expression whose first group is taken from a generation before scoring.
        train_steps: default optimiser steps for this task's stage.
        floor: the task's measured floor in points (0-100): the best answer-blind score on the test split, as
            :func:`tasks.floors.measured_floor` computes it; generated YAMLs store it (``floor:``). None: measured
            when a run needs it (:func:`tasks.floors.task_floor`). It replaces the declared ``chance`` level,
            which was wrong whenever the answers are unbalanced; ``chance`` is rejected.
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
    floor: float | None = None
    max_gen_toks: int = 16
    until: list[str] = field(default_factory=lambda: ["\n"])
    description: str = ""
    version: int = 1
    root: str = ""
    source: dict[str, Any] | None = None
    preprocess: str | None = None
    preprocess_args: dict[str, Any] = field(default_factory=dict)
    eval_target: str | None = None
    answer_regex: str | None = None
    _cache: dict[str, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        if self.source is not None:
            validate_source(self)
        if "test" not in self.splits:
            raise ValueError(f"task {self.name!r}: data needs a 'test' split")
        if self.group == "downstream" and "train" not in self.splits:
            raise ValueError(f"task {self.name!r}: a downstream task needs a 'train' split")
        if not isinstance(self.train_steps, int) or self.train_steps < 1:
            raise ValueError(f"task {self.name!r}: invalid train_steps {self.train_steps!r} (must be >= 1)")
        if self.floor is not None:
            ok = isinstance(self.floor, (int, float)) and not isinstance(self.floor, bool)
            if not ok or math.isnan(self.floor) or not 0 <= self.floor <= 100:
                raise ValueError(f"task {self.name!r}: invalid floor {self.floor!r} (points, 0-100)")
            self.floor = float(self.floor)

    @property
    def splits(self) -> list[str]:
        """Split names this task has (``train``/``test``), from ``data`` or from ``source``."""
        return sorted(self.source.get("splits", {})) if self.source is not None else sorted(self.data)

    def path(self, split: str) -> Path:
        p = Path(self.data[split])
        return p if p.is_absolute() else (Path(self.root) / p).resolve()

    def records(self, split: str) -> list[dict[str, Any]]:
        """Load a split's records: JSON lines from ``data``, or the upstream dataset of ``source`` (memoised)."""
        if self.source is None and self.preprocess is None:
            with open(self.path(split), encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if split not in self._cache:
            self._cache[split] = load_records(self, split, TASKS.get)
        return self._cache[split]

    def content_hash(self) -> str:
        """Hash of the spec (without its location) and of every split's data (file bytes or loaded records)."""
        h = hashlib.sha256()
        spec = {k: v for k, v in self.__dict__.items() if k not in ("root", "data") and not k.startswith("_")
                and not _unset_optional(k, v)}  # unset newer fields keep older tasks' hashes
        # keep older tasks' hashes: ``chance`` (removed) was hashed, 0.0 unless declared, so a task that never
        # declared one keeps its sequence ids, evaluation cache keys and base-model recipe
        spec["chance"] = 0.0
        h.update(json.dumps(spec, sort_keys=True, default=str).encode())
        for split in self.splits:
            h.update(split.encode())
            if self.source is None and self.preprocess is None:
                h.update(self.path(split).read_bytes())
            else:
                h.update(json.dumps(self.records(split), sort_keys=True, default=str).encode())
        return h.hexdigest()


def _reject_removed_fields(init: Any) -> Any:
    """Wrap the dataclass ``__init__``: a removed field gets one line of advice, not a TypeError."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        for name, advice in _REMOVED_FIELDS.items():
            if name in kwargs:
                task = kwargs.get("name", args[0] if args else "?")
                raise ValueError(f"task {task!r}: {name!r} is no longer accepted: {advice}")
        init(self, *args, **kwargs)

    return wrapper


TaskSpec.__init__ = _reject_removed_fields(TaskSpec.__init__)  # type: ignore[method-assign]


@dataclass
class GeneralSuite:
    """The general-knowledge suite: local task names, or lm-eval task names prefixed with ``lm_eval:``.

    Args:
        tasks: task names; ``lm_eval:<name>`` is one of lm-eval's own tasks or groups (e.g. ``lm_eval:mmlu``).
        num_fewshot: few-shot count for lm-eval tasks not listed in ``fewshot`` (None: the task's own default).
        fewshot: per-task few-shot counts, e.g. ``{lm_eval:mmlu: 5, lm_eval:piqa: 0}``.
        metrics: per-task lm-eval metric key, e.g. ``{lm_eval:gsm8k: "exact_match,strict-match"}`` (default:
            ``acc_norm``, else ``acc``, else ``exact_match``, first filter lm-eval reports).
        include_path: folder of extra lm-eval task YAMLs (relative to the suite file), e.g. offline copies.
        corpus: JSONL of general text (a ``text`` field per line, relative to the suite file) that methods may
            replay, e.g. the pretraining corpus; :func:`tasks.corpus.general_texts` removes every text that holds
            one of the suite's questions before any method sees it.
        limit: kept for old configs; ``eval.limit`` applies to every task.
    """

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    name: str = ""
    description: str = ""
    fewshot: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    include_path: str | None = None
    corpus: str | None = None
    root: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fewshot) - set(self.tasks)) + sorted(set(self.metrics) - set(self.tasks))
        if unknown:
            raise ValueError(f"suite {self.name or '?'!r}: fewshot/metrics name tasks not in the suite: {unknown}")
        for t, k in self.fewshot.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ValueError(f"suite {self.name or '?'!r}: invalid few-shot count {k!r} for {t!r}")

    def include_dir(self) -> str | None:
        """Absolute include path for lm-eval's TaskManager, or None."""
        if not self.include_path:
            return None
        p = Path(self.include_path)
        return str(p if p.is_absolute() else (Path(self.root) / p).resolve())

    def corpus_path(self) -> Path | None:
        """Absolute path of the general text corpus, or None."""
        if not self.corpus:
            return None
        p = Path(self.corpus)
        return p if p.is_absolute() else (Path(self.root) / p).resolve()


@dataclass
class SequenceSpec:
    """A named, ordered list of downstream tasks plus the general suite; steps may be overridden per task."""

    name: str
    tasks: list[str]
    general: GeneralSuite = field(default_factory=GeneralSuite)
    steps: dict[str, int] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.general, str):  # a suite name, resolved from the SUITES registry
            self.general = SUITES.get(self.general)
        elif isinstance(self.general, dict):
            self.general = GeneralSuite(**self.general)
        if not self.tasks:
            raise ValueError(f"sequence {self.name!r} has no tasks")


def register_suite(suite: GeneralSuite) -> GeneralSuite:
    """Register a named :class:`GeneralSuite` (YAML files under ``tasks/suites`` register themselves)."""
    SUITES.register(suite.name, suite, origin=f"builtin:{suite.root or 'python'}")
    return suite


def register_task(spec: TaskSpec) -> TaskSpec:
    """Register a :class:`TaskSpec` built in Python (YAML files under ``tasks/defs`` register themselves)."""
    TASKS.register(spec.name, spec, origin=f"builtin:{spec.root or 'python'}")
    return spec
