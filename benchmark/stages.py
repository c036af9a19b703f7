"""The stage loop: one run of a plan (a method, a seed, its stages), its lock, its resume point and its record.

:func:`run_one` takes the run's lock (another process working on it -> skipped), skips a run that already
succeeded with the same settings (unless ``force``), wraps a fresh base model, and continues after the newest
stage checkpoint if there is one (trainable state, RNG streams and the partial record restored: the result is
bit-identical to an uninterrupted run on CPU). Then, stage after stage: train on the stage's tasks, evaluate
every task, append the R and G rows. Any exception inside the run -- including out-of-memory and a non-finite
loss -- is recorded as ``status: failed`` with the error and the stage it happened in; the sweep goes on.
Continual runs and the joint reference (one pooled stage) run through this same loop.
"""

from __future__ import annotations

import copy
import gc
import logging
import random
import time
import traceback
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import checkpoint, weights
from benchmark.builtin_models import model_label, model_source
from benchmark.data import collate, encode_task, encode_texts
from benchmark.distributed import gather_objects, on_main
from benchmark.errors import UserError
from benchmark.evalcache import model_hash, stage_model_key
from benchmark.evaluate import spec_metric
from benchmark.locks import RunLock
from benchmark.models import load_base, prepare_for_training
from benchmark.paths import checkpoint_dir, lock_path, record_path
from benchmark.plan import Plan, RunPlan, run_inputs
from benchmark.precision import apply_policy, resolve_precision
from benchmark.records import (Costs, RunRecord, StageRow, environment, finished_result, first_difference,
                               git_info, write_record)
from benchmark.scoring import base_evaluation, cached_evaluation, peak_memory_mb, score_rows
from benchmark.sharding import gather_into, shard_model
from benchmark.trackers import finish_run, start_run
from benchmark.train import train_stage
from methods.base import StageData, TaskInfo
from tasks.corpus import general_texts
from tasks.floors import task_floor

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_record(plan: Plan, run: RunPlan) -> RunRecord:
    """A run record before its first stage (status ``running``).

    ``general_floor`` (one per general benchmark; None for lm-eval built-in tasks, whose floor is unknown) and
    ``task_floors`` (one per downstream task) are the measured floors of :mod:`tasks.floors` (schema 1.5).
    """
    return RunRecord(
        run_id=run.run_id, method=run.method, model=model_label(plan.cfg.model.name),
        model_source=model_source(plan.cfg.model.name), sequence=plan.sequence.name, sequence_id=plan.sequence_id,
        seed=run.seed, config=plan.cfg.to_dict(), method_config=run.method_config, precision=plan.precision,
        tasks=[t.name for t in plan.tasks], general_tasks=[g.name for g in plan.general] + plan.general_builtin,
        general_floor=[task_floor(g) for g in plan.general] + [None] * len(plan.general_builtin),
        task_floors=[task_floor(t) for t in plan.tasks],
        metric_names={t.name: spec_metric(t) for t in plan.tasks + plan.general},
        git=git_info(), env=environment(), kind=run.kind)


def run_one(plan: Plan, run: RunPlan, base_path: Path | None, out_dir: Path, accelerator: Any,
            quiet: bool = False, force: bool = False) -> RunRecord | None:
    """One run over its stages, resuming from its latest stage checkpoint.

    Returns its record (status ``success`` or ``failed``), the existing record when the run already succeeded
    with the same settings (unless ``force``), or None when another process holds the run's lock.
    """
    lock = RunLock(lock_path(out_dir, run.run_id))
    ckpt_dir = checkpoint_dir(out_dir, run.run_id)
    where = f"[{run.method} seed {run.seed}]"

    def decide() -> Any:
        if not lock.acquire():
            return "locked"
        done, diff = finished_result(record_path(out_dir, run.run_id), run_inputs(plan, run))
        if done is not None and diff is None and not force:
            checkpoint.remove(ckpt_dir)  # left if a crash fell between writing the record and this clean-up
            return done
        if force:
            checkpoint.remove(ckpt_dir)
            weights.remove(out_dir, run.run_id)  # kept by the run being redone
        checkpoint.clean_temp(ckpt_dir)
        return "go"

    try:
        decision = on_main(decide)  # rank 0 decides (and locks) for every process
        if decision == "locked":
            logger.info("%s skipped: another process is running %s", where, run.run_id)
            return None
        if isinstance(decision, RunRecord):
            logger.info("%s skipped: already finished (%s); use --force to redo", where, run.run_id)
            return decision
        return _run_stages(plan, run, base_path, out_dir, accelerator, quiet)
    finally:
        lock.release()


def _run_stages(plan: Plan, run: RunPlan, base_path: Path | None, out_dir: Path, accelerator: Any,
                quiet: bool) -> RunRecord:
    """Run (or continue) the stages and write the record; a failure inside is recorded, not raised."""
    rec = new_record(plan, run)
    clock = {"start": time.perf_counter(), "before": 0.0}  # wall time of this process / of earlier attempts
    threads_before = torch.get_num_threads()
    start_run(accelerator, run.run_id, plan.cfg.to_dict())
    try:
        _stage_loop(plan, run, base_path, out_dir, accelerator, quiet, rec, clock)
        rec.status, rec.failed_stage = "success", None
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # isolate the failure (incl. OOM, divergence): record it, let the other runs go on
        logger.error("[%s seed %d] failed: %s: %s", run.method, run.seed, type(exc).__name__, exc)
        rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
        rec.traceback = traceback.format_exc()
    finally:
        torch.set_num_threads(threads_before)
        finish_run(accelerator)
    _free_memory()  # the loop's frame (model, optimizer, activations) is gone by now
    costs = rec.costs = rec.costs or Costs()
    costs.train_seconds = sum(s.train_seconds for s in rec.stages)
    costs.eval_seconds = sum(s.eval_seconds for s in rec.stages)
    costs.wall_seconds = clock["before"] + time.perf_counter() - clock["start"]
    costs.peak_memory_mb = peak_memory_mb()
    if accelerator.is_main_process:
        write_record(record_path(out_dir, run.run_id), rec)
        if rec.status == "success":
            checkpoint.remove(checkpoint_dir(out_dir, run.run_id))  # the record holds every number
    return rec


def restore_checkpoint(ck: checkpoint.StageCheckpoint, method: Any, model: Any, gen: torch.Generator,
                       inputs: dict[str, Any], base_hash: str, where: str, policy: str) -> None:
    """Put the model, the RNG streams and the thread count back as they were after stage ``ck.stage``.

    The precision policy is applied first: a checkpoint holds the trainable weights in their training dtype
    (fp32 under ``bf16-mixed``), and loading them into the bf16 base parameters would round them.
    """
    diff = first_difference(ck.meta.get("inputs"), inputs)
    if diff or ck.meta.get("base_model_hash") != base_hash:
        raise RuntimeError(f"checkpoint {where} was made with other settings "
                           f"({diff or 'the base model weights changed'}); rerun with --force to start over")
    apply_policy(model, policy)
    method.load_trainable_state(model, ck.trainable)
    threads = ck.meta.get("torch_threads")
    if threads and threads != torch.get_num_threads():  # CPU results depend on it (restored after the run)
        logger.warning("%s: using %d torch threads, as the checkpoint did (not %d)", where, threads,
                       torch.get_num_threads())
        torch.set_num_threads(threads)
    checkpoint.restore_rng(ck.rng_tensors, ck.meta["rng"], gen)


def _stage_loop(plan: Plan, run: RunPlan, base_path: Path | None, out_dir: Path, accelerator: Any, quiet: bool,
                rec: RunRecord, clock: dict[str, float]) -> None:
    cfg = plan.cfg
    method_name, seed = run.method, run.seed
    ckpt_dir = checkpoint_dir(out_dir, run.run_id)
    inputs = run_inputs(plan, run)
    rec.failed_stage = 0  # 0 = before the first stage; updated as stages start
    seed_everything(seed)
    model, tok = load_base(cfg.model, base_path, plan.precision)
    base_hash = rec.base_model_hash = model_hash(model)  # before moving it: hashes CPU tensors
    sharded = cfg.train.sharding == "fsdp"
    if sharded:  # the base is scored on a sharded copy of its own, built only when the cache has no entry
        base = base_evaluation(plan, partial(sharded_base, plan, base_path, accelerator.device), tok, base_hash,
                               out_dir)
    else:
        model.to(accelerator.device)
    prepare_for_training(model, cfg.train.gradient_checkpointing)
    if not sharded:
        base = base_evaluation(plan, model, tok, base_hash, out_dir)
    method = run.cls(run.config)
    model = method.wrap(model)
    counts = method.param_counts(model)  # before sharding: a sharded model's parameters are slices
    keep = weights.resolve_keep(cfg.keep_weights, counts["trainable"], sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    ck = checkpoint.load_latest(ckpt_dir)
    done = 0
    if ck is not None:
        restore_checkpoint(ck, method, model, gen, inputs, base_hash, f"{run.run_id} stage {ck.stage}",
                           resolve_precision(cfg.train.precision, accelerator.device.type))
        resumed = RunRecord.from_dict(ck.meta["record"])
        resumed.git, resumed.env = git_info(), environment()
        resumed.resumed_from = resumed.resumed_from + [ck.stage]
        vars(rec).update(vars(resumed))  # in place: the caller records a failure on this same object
        clock["before"], done = ck.meta.get("elapsed_seconds", 0.0), ck.stage
        logger.info("[%s seed %d] resuming after stage %d/%d", method_name, seed, ck.stage, len(run.stages))
    else:
        r0, g0 = score_rows(plan, base.scores)
        rec.R.append(r0)
        rec.G.append(g0)
        rec.n_examples = base.n_examples
        rec.base_samples = base.samples  # stage 0 has no entry in "stages" (it trains nothing): named here
        rec.costs = Costs.from_dict({f"{k}_params": v for k, v in counts.items()})
        rec.diagnostics.append({"stage": 0, **method.diagnostics(model)})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    lr = cfg.train.method_lr(run.config.lr)
    # the budget the leaderboard shows next to the params; set on resume too (a checkpoint may predate them)
    rec.lr, rec.adapted_modules = lr, method.adapted_modules(model)
    # sharded: rank 0 keeps an unsharded CPU twin that the gathered weights are loaded into after every stage,
    # so the method's trainable_state / diagnostics and the checkpoint format are those of an unsharded run
    twin = None
    if sharded:
        apply_policy(model, resolve_precision(cfg.train.precision, accelerator.device.type))  # FSDP fixes dtypes
        twin = copy.deepcopy(model) if accelerator.is_main_process else None
        model = shard_model(model, accelerator.device)

    @cache
    def general() -> list[Any]:  # encoded once per run, and only for a method that asks
        texts = general_texts(plan.sequence.general, plan.general, plan.general_builtin)
        return encode_texts(texts, tok, cfg.train.max_seq_len)

    for i, stage in enumerate(run.stages, start=1):
        if i <= done:
            continue
        rec.failed_stage = i
        info = TaskInfo(name=stage.name, kind=stage.kind, stage=i, num_stages=len(run.stages))
        method.on_task_start(model, info)
        examples = [e for task in stage.tasks
                    for e in encode_task(task, tok, cfg.train.max_seq_len, chat=cfg.model.chat_template)]
        method.on_stage_data(model, info, StageData(examples, general, partial(collate, pad_id=tok.pad_token_id)))
        offset = sum(s.steps or 0 for s in rec.stages)  # the tracker's step axis runs across the stages
        stats = train_stage(model, method, examples, stage.steps, cfg.train, lr, gen, tok.pad_token_id,
                            accelerator, desc=f"{method_name} s{seed} {stage.name}", quiet=quiet, step_offset=offset)
        method.on_task_end(model, info)
        if sharded:
            gather_into(model, twin)
            state = method.trainable_state(twin) if twin is not None else {}
            key = on_main(lambda: stage_model_key(base_hash, run.cls, run.method_config, state))
        else:
            state = method.trainable_state(model)
            key = stage_model_key(base_hash, run.cls, run.method_config, state)
        res = cached_evaluation(plan, method.eval_model(model), tok, key, out_dir, "eval", f"stage {i} evaluation")
        r, g = score_rows(plan, res.scores)
        rec.R.append(r)
        rec.G.append(g)
        rec.stages.append(StageRow(stage=i, task=stage.name, steps=stats.steps, train_seconds=stats.seconds,
                                   eval_seconds=res.seconds, final_loss=stats.final_loss, tokens=stats.tokens,
                                   model_key=key, rank_model_keys=gather_objects(key), samples=res.samples,
                                   loss_curve=stats.loss_curve, aux_loss_curve=stats.aux_curve))
        if accelerator.trackers:
            accelerator.log({**{f"eval/{t.name}": v for t, v in zip(plan.tasks, r)},
                             "eval/general_mean": float(np.mean(g)) if g else float("nan")},
                            step=offset + stats.steps)
        rec.diagnostics.append({"stage": i, **(on_main(lambda: method.diagnostics(twin)) if sharded
                                               else method.diagnostics(model))})
        if weights.keeps_stage(keep, i, len(run.stages)):  # before the checkpoint, whose record says so
            if accelerator.is_main_process:
                kept = weights.save(out_dir, weights.KeptStage(run.run_id, i, key, base_hash, run.method,
                                                               run.method_config), state)
                logger.info("[%s seed %d] kept the weights of stage %d in %s", method_name, seed, i, kept)
            rec.kept_weights = sorted(set(rec.kept_weights or []) | {i})
        if accelerator.is_main_process:  # the resume point: written after the stage's rows are in the record
            checkpoint.save_stage(ckpt_dir, i, state, gen, {
                "run_id": run.run_id, "inputs": inputs, "base_model_hash": base_hash, "record": rec.to_dict(),
                "elapsed_seconds": clock["before"] + time.perf_counter() - clock["start"]})
        logger.info("[%s seed %d] stage %d/%d %s: loss %.3f | %s | general %.1f (base %.1f) | %.0fs train, %.0fs eval",
                    method_name, seed, i, len(run.stages), stage.name, stats.final_loss,
                    " ".join(f"{t.name}={v:.1f}" for t, v in zip(plan.tasks, r)),
                    float(np.mean(g)) if g else float("nan"), float(np.mean(rec.G[0])) if g else float("nan"),
                    stats.seconds, res.seconds)


def sharded_base(plan: Plan, base_path: Path | None, device: torch.device) -> Any:
    """A fresh copy of the base model, sharded over every process (for the stage-0 evaluation)."""
    model, _ = load_base(plan.cfg.model, base_path, plan.precision)
    return shard_model(model, device)


def _free_memory() -> None:
    """Give memory back after a run (a failed one may have died holding large activations)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
