"""One (method, seed) run: its lock, its resume point, the stage loop, and its record.

``run_one`` takes the run's lock (another process working on it -> skipped), skips a run that already
succeeded (unless ``force``), wraps a fresh base model, and continues after the newest stage checkpoint if
there is one (trainable state, RNG streams and the partial record restored: the result is bit-identical to an
uninterrupted run on CPU). Any exception inside the run -- including out-of-memory and a non-finite loss -- is
recorded as ``status: failed`` with the error and the stage it happened in; the sweep goes on.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import checkpoint
from benchmark.builtin_models import model_label, model_source
from benchmark.distributed import on_main
from benchmark.errors import UserError
from benchmark.evaluate import spec_metric
from benchmark.evalcache import model_hash, stage_model_key
from benchmark.locks import RunLock
from benchmark.paths import checkpoint_dir, lock_path, record_path
from benchmark.records import SCHEMA_VERSION, environment, git_info, read_json, write_json
from benchmark.runner import (Plan, _evaluate, _peak_memory_mb, _rows, base_evaluation, run_id, seed_everything,
                              stage_steps)

logger = logging.getLogger(__name__)


def new_record(plan: Plan, rid: str, method_name: str, seed: int, mcfg: Any) -> dict[str, Any]:
    """A run record before its first stage (status ``running``).

    ``general_floor`` (one per general benchmark; None for lm-eval built-in tasks, whose floor is unknown) and
    ``task_floors`` (one per downstream task) are the measured floors of :mod:`tasks.floors` (schema 1.5).
    """
    from tasks.floors import task_floor

    return {
        "schema_version": SCHEMA_VERSION, "run_id": rid, "method": method_name,
        "model": model_label(plan.cfg.model.name), "model_source": model_source(plan.cfg.model.name),
        "sequence": plan.sequence.name, "sequence_id": plan.sequence_id, "seed": seed, "status": "running",
        "error": None, "failed_stage": None, "config": plan.cfg.to_dict(), "method_config": mcfg.to_dict(),
        "precision": plan.precision,
        "tasks": [t.name for t in plan.tasks], "general_tasks": [g.name for g in plan.general] + plan.general_builtin,
        "general_floor": [task_floor(g) for g in plan.general] + [None] * len(plan.general_builtin),
        "task_floors": [task_floor(t) for t in plan.tasks],
        "metric_names": {t.name: spec_metric(t) for t in plan.tasks + plan.general},
        "git": git_info(), "env": environment(), "resumed_from": [], "R": [], "G": [], "stages": [],
        "diagnostics": [],
    }


def run_inputs(plan: Plan, method_name: str, seed: int) -> dict[str, Any]:
    """What the run's numbers depend on (compared with a checkpoint's or a finished record's)."""
    return checkpoint.result_inputs(plan.cfg.to_dict(), method_name, plan.methods[method_name][1].to_dict(),
                                    plan.sequence_id, seed, plan.precision)


def run_one(plan: Plan, method_name: str, seed: int, base_path: Path | None, out_dir: Path, accelerator: Any,
            quiet: bool = False, force: bool = False) -> dict[str, Any] | None:
    """One (method, seed) run over the sequence, resuming from its latest stage checkpoint.

    Returns its record (status ``success`` or ``failed``), the existing record when the run already succeeded
    (unless ``force``), or None when another process holds the run's lock.
    """
    rid = run_id(plan, method_name, seed)
    lock = RunLock(lock_path(out_dir, rid))
    ckpt_dir = checkpoint_dir(out_dir, rid)

    def decide() -> Any:
        if not lock.acquire():
            return "locked"
        done = record_path(out_dir, rid)
        if done.is_file() and not force:
            try:
                old = read_json(done)
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("status") == "success":
                checkpoint.remove(ckpt_dir)  # left if a crash fell between writing the record and this clean-up
                return old
        if force:
            checkpoint.remove(ckpt_dir)
        checkpoint.clean_temp(ckpt_dir)
        return "go"

    try:
        decision = on_main(decide)  # rank 0 decides (and locks) for every process
        if decision == "locked":
            logger.info("[%s seed %d] skipped: another process is running %s", method_name, seed, rid)
            return None
        if isinstance(decision, dict):
            logger.info("[%s seed %d] skipped: already finished (%s); use --force to redo", method_name, seed, rid)
            return decision
        return _run_stages(plan, method_name, seed, rid, base_path, out_dir, accelerator, quiet)
    finally:
        lock.release()


def _run_stages(plan: Plan, method_name: str, seed: int, rid: str, base_path: Path | None, out_dir: Path,
                accelerator: Any, quiet: bool) -> dict[str, Any]:
    """Run (or continue) the stages and write the record; a failure inside is recorded, not raised."""
    rec = new_record(plan, rid, method_name, seed, plan.methods[method_name][1])
    clock = {"start": time.perf_counter(), "before": 0.0}  # wall time of this process / of earlier attempts
    threads_before = torch.get_num_threads()
    try:
        _stage_loop(plan, method_name, seed, rid, base_path, out_dir, accelerator, quiet, rec, clock)
        rec["status"], rec["failed_stage"] = "success", None
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # isolate the failure (incl. OOM, divergence): record it, let the other runs go on
        logger.error("[%s seed %d] failed: %s: %s", method_name, seed, type(exc).__name__, exc)
        rec["status"], rec["error"] = "failed", f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()
    finally:
        torch.set_num_threads(threads_before)
    _free_memory()  # the loop's frame (model, optimizer, activations) is gone by now
    costs = rec.setdefault("costs", {})
    costs["train_seconds"] = sum(s["train_seconds"] for s in rec["stages"])
    costs["eval_seconds"] = sum(s["eval_seconds"] for s in rec["stages"])
    costs["wall_seconds"] = clock["before"] + time.perf_counter() - clock["start"]
    costs["peak_memory_mb"] = _peak_memory_mb()
    if accelerator.is_main_process:
        write_json(record_path(out_dir, rid), rec)
        if rec["status"] == "success":
            checkpoint.remove(checkpoint_dir(out_dir, rid))  # the record holds every number (see checkpoint.py)
    return rec


def _resume(ck: checkpoint.StageCheckpoint, method: Any, model: Any, gen: torch.Generator, inputs: dict[str, Any],
            base_hash: str, where: str) -> None:
    """Put the model, the RNG streams and the thread count back as they were after stage ``ck.stage``."""
    diff = checkpoint.first_difference(ck.meta.get("inputs"), inputs)
    if diff or ck.meta.get("base_model_hash") != base_hash:
        raise RuntimeError(f"checkpoint {where} was made with other settings "
                           f"({diff or 'the base model weights changed'}); rerun with --force to start over")
    method.load_trainable_state(model, ck.trainable)
    threads = ck.meta.get("torch_threads")
    if threads and threads != torch.get_num_threads():  # CPU results depend on it (restored after the run)
        logger.warning("%s: using %d torch threads, as the checkpoint did (not %d)", where, threads,
                       torch.get_num_threads())
        torch.set_num_threads(threads)
    checkpoint.restore_rng(ck.rng_tensors, ck.meta["rng"], gen)


def _stage_loop(plan: Plan, method_name: str, seed: int, rid: str, base_path: Path | None, out_dir: Path,
                accelerator: Any, quiet: bool, rec: dict[str, Any], clock: dict[str, float]) -> None:
    from benchmark.data import encode_task
    from benchmark.distributed import gather_objects
    from benchmark.models import load_base, prepare_for_training
    from benchmark.train import train_stage
    from methods.base import TaskInfo

    cfg = plan.cfg
    cls, mcfg = plan.methods[method_name]
    ckpt_dir = checkpoint_dir(out_dir, rid)
    inputs = run_inputs(plan, method_name, seed)
    rec["failed_stage"] = 0  # 0 = before the first stage; updated as stages start
    seed_everything(seed)
    model, tok = load_base(cfg.model, base_path, plan.precision)
    base_hash = rec["base_model_hash"] = model_hash(model)  # before moving it: hashes CPU tensors
    model.to(accelerator.device)
    prepare_for_training(model, cfg.train.gradient_checkpointing)
    base = base_evaluation(plan, model, tok, base_hash, out_dir)
    method = cls(mcfg)
    model = method.wrap(model)
    gen = torch.Generator().manual_seed(seed)
    ck = checkpoint.load_latest(ckpt_dir)
    done = 0
    if ck is not None:
        _resume(ck, method, model, gen, inputs, base_hash, f"{rid} stage {ck.stage}")
        resumed = ck.meta["record"]
        rec.clear()
        rec.update({**resumed, "git": git_info(), "env": environment(),
                    "resumed_from": resumed.get("resumed_from", []) + [ck.stage]})
        clock["before"], done = ck.meta.get("elapsed_seconds", 0.0), ck.stage
        logger.info("[%s seed %d] resuming after stage %d/%d", method_name, seed, ck.stage, len(plan.tasks))
    else:
        rec["R"].append(base["R0"])
        rec["G"].append(base["G0"])
        rec["n_examples"] = base["n_examples"]
        if "samples" in base:  # stage 0 has no entry in "stages" (it trains nothing): named here
            rec["base_samples"] = base["samples"]
        rec["costs"] = {f"{k}_params": v for k, v in method.param_counts(model).items()}
        rec["diagnostics"].append({"stage": 0, **method.diagnostics(model)})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    lr = cfg.train.method_lr(mcfg.lr)
    # the budget the leaderboard shows next to the params; set on resume too (a checkpoint may predate them)
    rec["lr"], rec["adapted_modules"] = lr, method.adapted_modules(model)
    for i, task in enumerate(plan.tasks, start=1):
        if i <= done:
            continue
        rec["failed_stage"] = i
        info = TaskInfo(name=task.name, kind=task.kind, stage=i, num_stages=len(plan.tasks))
        method.on_task_start(model, info)
        examples = encode_task(task, tok, cfg.train.max_seq_len, chat=cfg.model.chat_template)
        stats = train_stage(model, method, examples, stage_steps(plan, task), cfg.train, lr, gen,
                            tok.pad_token_id, accelerator, desc=f"{method_name} s{seed} {task.name}", quiet=quiet)
        method.on_task_end(model, info)
        state = method.trainable_state(model)
        key = stage_model_key(base_hash, cls, mcfg.to_dict(), state)
        res = _evaluate(plan, method.eval_model(model), tok, key, out_dir, "eval", f"stage {i} evaluation")
        r, g = _rows(plan, res)
        rec["R"].append(r)
        rec["G"].append(g)
        rec["stages"].append({"stage": i, "task": task.name, "steps": stats.steps, "train_seconds": stats.seconds,
                              "eval_seconds": res["seconds"], "final_loss": stats.final_loss, "tokens": stats.tokens,
                              "model_key": key,  # content hash of the model after this stage
                              "rank_model_keys": gather_objects(key),  # one per process: equal iff in sync
                              **({"samples": res["samples"]} if "samples" in res else {})})
        rec["diagnostics"].append({"stage": i, **method.diagnostics(model)})
        if accelerator.is_main_process:  # the resume point: written after the stage's rows are in the record
            checkpoint.save_stage(ckpt_dir, i, state, gen, {
                "run_id": rid, "inputs": inputs, "base_model_hash": base_hash, "record": rec,
                "elapsed_seconds": clock["before"] + time.perf_counter() - clock["start"]})
        logger.info("[%s seed %d] stage %d/%d %s: loss %.3f | %s | general %.1f (base %.1f) | %.0fs train, %.0fs eval",
                    method_name, seed, i, len(plan.tasks), task.name, stats.final_loss,
                    " ".join(f"{t.name}={v:.1f}" for t, v in zip(plan.tasks, r)),
                    float(np.mean(g)) if g else float("nan"), float(np.mean(rec["G"][0])) if g else float("nan"),
                    stats.seconds, res["seconds"])


def _free_memory() -> None:
    """Give memory back after a run (a failed one may have died holding large activations)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
