"""The plan: an experiment config resolved into tasks, method configs and runs, before any work starts.

A :class:`RunPlan` is one run the stage loop executes: a method (class and config), a seed, and its stages. A
continual run has one stage per task of the sequence; the joint reference (:mod:`benchmark.reference`) is a
run of the same shape with one pooled stage. Run ids and sequence ids are derived here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from benchmark.config import ExperimentConfig, build_dataclass
from benchmark.errors import UserError
from benchmark.evaluate import LM_EVAL_PREFIX
from benchmark.models import model_slug
from benchmark.paths import safe_component
from benchmark.precision import resolve_precision
from benchmark.records import result_inputs
from benchmark.shard import shard_slice
from methods import METHODS
from tasks import SEQUENCES, TASKS, resolve_suite


@dataclass
class Plan:
    """Everything resolved and validated before any work starts."""

    cfg: ExperimentConfig
    sequence: Any
    sequence_id: str
    tasks: list[Any]
    general: list[Any]
    general_builtin: list[str]
    methods: dict[str, Any] = field(default_factory=dict)  # name -> (class, config)
    precision: str = "fp32"  # train.precision resolved for this machine (benchmark/precision.py)

    def runs(self) -> list[tuple[str, int]]:
        """(method, seed) pairs in plan order; with ``shard: K/N`` only the K-th round-robin slice of them."""
        return shard_slice([(m, s) for m in self.cfg.methods for s in self.cfg.seeds], self.cfg.shard)


@dataclass(frozen=True)
class StagePlan:
    """One stage: train on the pooled training sets of ``tasks`` for ``steps`` optimiser steps."""

    name: str  # the task's name (``joint`` for a pooled stage): the record's ``stages[].task``
    tasks: tuple[Any, ...]
    steps: int
    kind: str  # what the method is told (``TaskInfo.kind``): "knowledge" or "skill"


@dataclass
class RunPlan:
    """One run of the stage loop: which method, how configured, which seed, and its stages."""

    method: str  # the name in the record (a registered method, or e.g. ``joint_reference``)
    seed: int
    cls: type
    config: Any  # the method's validated config dataclass
    method_config: dict[str, Any]  # what the record stores, the checkpoint checks and the evaluation cache keys
    stages: list[StagePlan]
    run_id: str
    kind: str = "method"  # the record's kind (benchmark.records.KINDS)


def sequence_id(seq: Any, tasks: list[Any], general: list[Any], builtin: list[str]) -> str:
    """``name@hash``: the hash covers the ordered task list, step counts, data files and the general suite."""
    h = hashlib.sha256()
    h.update(json.dumps({"tasks": seq.tasks, "steps": seq.steps, "builtin": builtin}, sort_keys=True).encode())
    for spec in tasks + general:
        h.update(spec.content_hash().encode())
    return f"{seq.name}@{h.hexdigest()[:10]}"


def make_plan(cfg: ExperimentConfig) -> Plan:
    """Resolve names and build every method config; raises :class:`UserError` on any bad input."""
    seq = SEQUENCES.get(cfg.sequence)
    if cfg.general is not None:  # --general: another suite for this run (the sequence id says so)
        seq = dataclasses.replace(seq, general=resolve_suite(cfg.general))
    tasks = [TASKS.get(n) for n in seq.tasks]
    for t in tasks:
        if t.group != "downstream":
            raise UserError(f"sequence {seq.name!r}: task {t.name!r} is a general task, not a downstream one")
    general = [TASKS.get(n) for n in seq.general.tasks if not n.startswith(LM_EVAL_PREFIX)]
    builtin = [n for n in seq.general.tasks if n.startswith(LM_EVAL_PREFIX)]
    for spec in tasks + general:
        for split, _ in spec.data.items():
            if not spec.path(split).is_file():
                raise UserError(f"task {spec.name!r}: {split} data file not found: {str(spec.path(split))!r}")
    plan = Plan(cfg, seq, sequence_id(seq, tasks, general, builtin), tasks, general, builtin,
                precision=resolve_precision(cfg.train.precision))
    unknown = set(cfg.method_options) - set(METHODS.names())
    if unknown:
        METHODS.get(sorted(unknown)[0])  # raises the did-you-mean error
    for name in cfg.methods:
        cls = METHODS.get(name)
        opts = cfg.method_options.get(name, {})
        plan.methods[name] = (cls, build_dataclass(cls.config_cls, opts, f"methods.{name}."))
    return plan


def stage_steps(plan: Plan, task: Any) -> int:
    """Optimiser steps of the stage that trains on ``task``: the sequence's count, scaled and capped."""
    steps = plan.sequence.steps.get(task.name, task.train_steps)
    steps = max(1, round(steps * plan.cfg.train.steps_scale))
    return min(steps, plan.cfg.train.max_steps) if plan.cfg.train.max_steps else steps


def sequence_stages(plan: Plan) -> list[StagePlan]:
    """One stage per task of the sequence, in order."""
    return [StagePlan(t.name, (t,), stage_steps(plan, t), t.kind) for t in plan.tasks]


def method_label(plan: Plan, method_name: str) -> str:
    """The method's name, plus ``-<8 hex>`` of its configuration when that differs from the method's defaults.

    An ablation (``--set methods.hilo.ranks=uniform5``) thus gets run ids of its own: it can share a results
    folder with the default runs and be merged with them without either replacing the other.
    """
    entry = plan.methods.get(method_name)
    if entry is None:  # e.g. the joint reference
        return method_name
    cls, mcfg = entry
    try:
        default = cls.config_cls().to_dict()
    except TypeError:  # a plugin config with required fields: compare with the options actually given
        default = None if plan.cfg.method_options.get(method_name) else mcfg.to_dict()
    config = mcfg.to_dict()
    if config == default:
        return method_name
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{method_name}-{digest[:8]}"


def run_id(plan: Plan, method_name: str, seed: int) -> str:
    """``<method>--<model>--<sequence>--seed<k>`` (see :func:`method_label`), one safe file-name component."""
    return safe_component(f"{method_label(plan, method_name)}--{model_slug(plan.cfg.model.name)}--"
                          f"{plan.sequence.name}--seed{seed}")


def method_runs(plan: Plan) -> list[RunPlan]:
    """The continual runs of the plan (every method x seed of this shard), in plan order."""
    stages = sequence_stages(plan)
    out = []
    for name, seed in plan.runs():
        cls, mcfg = plan.methods[name]
        out.append(RunPlan(name, seed, cls, mcfg, mcfg.to_dict(), stages, run_id(plan, name, seed)))
    return out


def run_inputs(plan: Plan, run: RunPlan) -> dict[str, Any]:
    """What the run's numbers depend on (compared with a checkpoint's or a finished record's)."""
    return result_inputs(plan.cfg.to_dict(), run.method, run.method_config, plan.sequence_id, run.seed,
                         plan.precision)
