"""Reference runs: the multi-task joint-training upper bound of a sequence (``reference: joint``), as plan runs.

The reference fine-tunes the base model fully (the registered ``full_ft`` method, reached through the registry)
on the union of all the sequence's downstream training sets in ONE stage of ``sum of the stage steps``
optimiser steps, batches drawn uniformly from the pooled examples (each task weighs in proportion to its
training-set size), and is evaluated like any stage. This module only builds that run: the stage loop
(:mod:`benchmark.stages`) executes it like any other, with its lock, checkpoint, failure handling and costs.
Its record has ``kind: "reference"`` and method ``joint_reference``; the leaderboard uses its per-task scores
a*_k to report ``intransigence`` (Chaudhry et al. 2018) for the other methods of the same model and sequence.
Convention (not the paper's): a*_k comes from joint training on ALL tasks of the sequence, not only on the tasks
seen up to k; with several seeds, a*_k is the mean over the reference seeds.
"""

from __future__ import annotations

from benchmark.config import check_reference
from benchmark.plan import Plan, RunPlan, StagePlan, method_runs, run_id, sequence_stages
from benchmark.shard import shard_slice
from methods import METHODS

JOINT = "joint_reference"
BASE_METHOD = "full_ft"


def joint_run(plan: Plan, seed: int) -> RunPlan:
    """The joint-training run of one seed: ``full_ft`` at its defaults, one pooled stage."""
    cls = METHODS.get(BASE_METHOD)
    mcfg = cls.config_cls()
    stages = sequence_stages(plan)
    pooled = StagePlan("joint", tuple(t for s in stages for t in s.tasks), sum(s.steps for s in stages), "skill")
    method_config = {"base_method": BASE_METHOD, "training": "joint", **mcfg.to_dict()}
    return RunPlan(JOINT, seed, cls, mcfg, method_config, [pooled], run_id(plan, JOINT, seed), kind="reference")


def reference_runs(plan: Plan) -> list[RunPlan]:
    """The configured reference (``plan.cfg.reference``) once per seed; none when it is unset.

    With ``shard: K/N`` the reference seeds are split round-robin too, so N shards run each of them once.
    """
    name = plan.cfg.reference
    check_reference(name)
    return [joint_run(plan, seed) for seed in shard_slice(list(plan.cfg.seeds), plan.cfg.shard)] if name else []


def all_runs(plan: Plan) -> list[RunPlan]:
    """Every run of the plan (this shard's): the continual runs in plan order, then the reference runs."""
    return method_runs(plan) + reference_runs(plan)
