"""The orchestration of ``run``: validate the plan, build or fetch the base model, run every run, write tables.

The runs themselves go through :func:`benchmark.stages.run_one` (continual runs and the joint reference alike);
the runner reaches methods and tasks only through their registries and never branches on a method's name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from benchmark import checkpoint
from benchmark.builtin_models import ensure_builtin, is_builtin
from benchmark.config import TINY_WORLD, ExperimentConfig
from benchmark.distributed import make_accelerator
from benchmark.trackers import tracker_kwargs
from benchmark.errors import UserError
from benchmark.leaderboard import write_all
from benchmark.locks import exclusive
from benchmark.models import tinyworld_path
from benchmark.paths import checkpoint_dir, lock_path, record_path
from benchmark.plan import Plan, RunPlan, run_inputs, sequence_stages
from benchmark.records import finished_result
from benchmark.reference import all_runs
from benchmark.stages import run_one
from benchmark.validate import validate
from tasks import SUITES, TASKS

logger = logging.getLogger(__name__)


def run_status(plan: Plan, run: RunPlan, force: bool = False) -> str:
    """What ``run`` would do with this run: ``new``, ``resume from stage k/N`` or ``done``.

    The same tests as the runner's (:func:`benchmark.stages.run_one`): a successful record with the same
    settings is skipped, else the latest stage checkpoint is resumed; ``force`` starts every run over.
    """
    out = plan.cfg.output
    if force:
        return "new (--force)"
    done, diff = finished_result(record_path(out, run.run_id), run_inputs(plan, run))
    if done is not None and diff is None:
        return "done"
    meta = checkpoint.latest_meta(checkpoint_dir(out, run.run_id))
    stage = meta.get("stage") if meta else None
    if not isinstance(stage, int):
        return "new"
    n = len(run.stages)
    # a checkpoint after the last stage: only the record was left to write when the run stopped
    return f"resume from stage {stage + 1}/{n}" if stage < n else f"resume after stage {stage}/{n}"


def describe(plan: Plan, force: bool = False) -> str:
    """The dry-run text: methods x seeds x stages, then every run and its status (:func:`run_status`)."""
    stages = sequence_stages(plan)
    runs = all_runs(plan)
    n_method = len(plan.runs())
    lines = [f"sequence {plan.sequence_id}: " + " -> ".join(f"{s.name}({s.steps} steps)" for s in stages),
             f"general suite: {', '.join([g.name for g in plan.general] + plan.general_builtin) or '(none)'}",
             f"model: {plan.cfg.model.name}",
             f"{len(plan.cfg.methods)} methods x {len(plan.cfg.seeds)} seeds x {len(stages)} stages "
             f"= {n_method} runs, {n_method * len(stages)} stages"
             + (f" (shard {plan.cfg.shard} of the plan)" if plan.cfg.shard else "")]
    lines += [f"  run {r.method} seed {r.seed}: {run_status(plan, r, force)}" for r in runs if r.kind == "method"]
    if plan.cfg.reference:  # see benchmark/reference.py
        steps = sum(s.steps for s in stages)
        lines.append(f"  + reference {plan.cfg.reference}: one run per seed, one stage of {steps} steps")
        lines += [f"    seed {r.seed}: {run_status(plan, r, force)}" for r in runs if r.kind != "method"]
    return "\n".join(lines)


def base_model_path(plan: Plan, quiet: bool) -> Path | None:
    """The cached folder of tiny-world or a built-in model (built on first use), or None for a hub / local model."""
    if is_builtin(plan.cfg.model.name):
        return ensure_builtin(plan.cfg.model.name)
    if plan.cfg.model.name != TINY_WORLD:
        return None
    # the base is pretrained until it knows all the tiny-world facts (both halves: the test suite and the
    # validation suite), whatever suite this run reports, so tuning on validation and testing share one base
    facts = [TASKS.get(n) for suite in ("tiny-world", "tiny-world-val") for n in SUITES.get(suite).tasks]
    return tinyworld_path(plan.cfg.model.pretrain, facts, quiet=quiet)


def write_leaderboard(out_dir: Path) -> Any:
    """Rebuild scores and leaderboard under the directory's leaderboard lock (every file replaced atomically).

    Each process writes its run records before taking the lock, so the last rewrite sees every finished run.
    """
    with exclusive(lock_path(out_dir, "leaderboard")):
        return write_all(out_dir)


def run_experiment(cfg: ExperimentConfig, quiet: bool = False, force: bool = False, plan: Plan | None = None,
                   only: str | None = None) -> int:
    """Run the whole plan; returns the process exit code (1 when any run failed).

    ``plan`` is the result of :func:`benchmark.validate.validate` (done here when not given): nothing is
    written before the whole configuration has been checked. ``only``: run just the run of this id (one job of
    :mod:`benchmark.jobs`; a joint reference cannot be singled out by ``methods`` and ``seeds`` alone).
    """
    plan = plan if plan is not None else validate(cfg, force=force)
    runs = [r for r in all_runs(plan) if only is None or r.run_id == only]
    if only is not None and not runs:
        raise UserError(f"run {only!r} is not in the plan of this configuration")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output)
    accelerator = make_accelerator(**tracker_kwargs(cfg.report_to, cfg.output))
    # rank 0 builds (or fetches) the base; the others then find it cached. Before the output folder exists, so a
    # failed fetch leaves nothing behind.
    with accelerator.main_process_first():
        base_path = base_model_path(plan, quiet)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for run in runs:
        rec = run_one(plan, run, base_path, out_dir, accelerator, quiet=quiet, force=force)
        if rec is not None and rec.status != "success":
            failed.append(f"{rec.run_id} ({rec.error})")
    if accelerator.is_main_process:
        df = write_leaderboard(out_dir)
        logger.info("wrote %s (%d leaderboard rows)", out_dir / "leaderboard.md", len(df))
    if failed:
        logger.error("%d of %d runs failed (records in %s): %s", len(failed), len(runs), out_dir / "runs",
                     "; ".join(failed))
    return 1 if failed else 0
