"""Reference runs: the multi-task joint-training upper bound of a sequence (``reference: joint``).

The reference fine-tunes the base model fully (the registered ``full_ft`` method, reached through the registry)
on the union of all the sequence's downstream training sets in ONE stage of ``sum of the stage steps``
optimiser steps, batches drawn uniformly from the pooled examples (each task weighs in proportion to its
training-set size), and is evaluated like any stage. Its record has ``kind: "reference"`` and method
``joint_reference``; the leaderboard uses its per-task scores a*_k to report ``intransigence`` (Chaudhry et al.
2018) for the other methods of the same model and sequence. Convention (not the paper's): a*_k comes from joint
training on ALL tasks of the sequence, not only on the tasks seen up to k; with several seeds, a*_k is the mean
over the reference seeds. A reference run is not checkpointed per stage (it has one stage); a finished one
with the same settings is reused.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from benchmark.errors import UserError
from benchmark.records import SCHEMA_VERSION, read_json, write_json

logger = logging.getLogger(__name__)
REFERENCES = ("joint",)
JOINT = "joint_reference"
BASE_METHOD = "full_ft"


def check_reference(name: str | None) -> None:
    """Validate a ``reference`` config value (None = no reference run)."""
    if name is not None and name not in REFERENCES:
        raise UserError(f"invalid reference: {name!r}; valid: {', '.join(REFERENCES)} (or leave it unset)")


def _inputs(plan: Any, method_config: dict[str, Any], seed: int) -> dict[str, Any]:
    from benchmark.checkpoint import result_inputs

    return result_inputs(plan.cfg.to_dict(), JOINT, method_config, plan.sequence_id, seed, plan.precision)


def _finished(path: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The existing successful record made with the same settings, if any (re-running a command costs nothing)."""
    from benchmark.checkpoint import record_precision, result_inputs

    try:
        old = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("status") != "success" or not isinstance(old.get("config"), dict):
        return None
    same = result_inputs(old["config"], JOINT, old.get("method_config"), old.get("sequence_id"), old.get("seed"),
                         record_precision(old))
    return old if same == inputs else None


def run_joint(plan: Any, seed: int, base_path: Path | None, out_dir: Path, accelerator: Any,
              quiet: bool = False) -> dict[str, Any] | None:
    """One joint-training reference run; returns its record (None when another process is running it)."""
    import torch

    from benchmark import runner
    from benchmark.data import encode_task
    from benchmark.evalcache import model_hash, stage_model_key
    from benchmark.locks import RunLock
    from benchmark.models import load_base, prepare_for_training
    from benchmark.paths import lock_path, record_path
    from benchmark.stages import new_record
    from benchmark.train import train_stage
    from methods import METHODS
    from methods.base import TaskInfo

    cfg = plan.cfg
    cls = METHODS.get(BASE_METHOD)
    mcfg = cls.config_cls()
    method_config = {"base_method": BASE_METHOD, "training": "joint", **mcfg.to_dict()}
    rid = runner.run_id(plan, JOINT, seed)
    inputs = _inputs(plan, method_config, seed)
    lock = RunLock(lock_path(out_dir, rid))
    if not lock.acquire():
        logger.info("[%s] skipped: another process is running it", rid)
        return None
    try:
        done = _finished(record_path(out_dir, rid), inputs)
        if done is not None:
            logger.info("[%s] skipped: already finished", rid)
            return done
        rec = new_record(plan, rid, JOINT, seed, mcfg)
        rec.update(schema_version=SCHEMA_VERSION, kind="reference", method_config=method_config)
        t_start = time.perf_counter()
        try:
            runner.seed_everything(seed)
            model, tok = load_base(cfg.model, base_path, plan.precision)
            base_hash = rec["base_model_hash"] = model_hash(model)
            model.to(accelerator.device)
            prepare_for_training(model, cfg.train.gradient_checkpointing)
            base = runner.base_evaluation(plan, model, tok, base_hash, out_dir)
            rec["R"].append(base["R0"])
            rec["G"].append(base["G0"])
            rec["n_examples"] = base["n_examples"]
            if "samples" in base:
                rec["base_samples"] = base["samples"]
            method = cls(mcfg)
            model = method.wrap(model)
            rec["costs"] = {f"{k}_params": v for k, v in method.param_counts(model).items()}
            info = TaskInfo(name="joint", kind="skill", stage=1, num_stages=1)
            method.on_task_start(model, info)
            examples = [e for task in plan.tasks
                        for e in encode_task(task, tok, cfg.train.max_seq_len, chat=cfg.model.chat_template)]
            steps = sum(runner.stage_steps(plan, t) for t in plan.tasks)
            lr = cfg.train.method_lr(mcfg.lr)
            stats = train_stage(model, method, examples, steps, cfg.train, lr, torch.Generator().manual_seed(seed),
                                tok.pad_token_id, accelerator, desc=f"{JOINT} s{seed}", quiet=quiet)
            method.on_task_end(model, info)
            key = stage_model_key(base_hash, cls, method_config, method.trainable_state(model))
            res = runner._evaluate(plan, method.eval_model(model), tok, key, out_dir, "eval", "joint evaluation")
            r, g = runner._rows(plan, res)
            rec["R"].append(r)
            rec["G"].append(g)
            rec["stages"].append({"stage": 1, "task": "joint", "steps": stats.steps, "train_seconds": stats.seconds,
                                  "eval_seconds": res["seconds"], "final_loss": stats.final_loss,
                                  "tokens": stats.tokens, **({"samples": res["samples"]} if "samples" in res else {})})
            rec["diagnostics"].append({"stage": 1, **method.diagnostics(model)})
            rec["status"], rec["failed_stage"] = "success", None
            logger.info("[%s] joint training, %d steps: %s", rid, stats.steps,
                        " ".join(f"{t.name}={v:.1f}" for t, v in zip(plan.tasks, r)))
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:  # isolate the failure like any run: record it, let the others go on
            logger.error("[%s] failed: %s: %s", rid, type(exc).__name__, exc)
            rec["status"], rec["error"] = "failed", f"{type(exc).__name__}: {exc}"
            rec["failed_stage"], rec["traceback"] = 1, traceback.format_exc()
        costs = rec.setdefault("costs", {})
        costs["train_seconds"] = sum(s["train_seconds"] for s in rec["stages"])
        costs["eval_seconds"] = sum(s["eval_seconds"] for s in rec["stages"])
        costs["wall_seconds"] = time.perf_counter() - t_start
        costs["peak_memory_mb"] = runner._peak_memory_mb()
        if accelerator.is_main_process:
            write_json(record_path(out_dir, rid), rec)
        return rec
    finally:
        lock.release()


def run_references(plan: Any, base_path: Path | None, out_dir: Path, accelerator: Any,
                   quiet: bool = False) -> list[str]:
    """Run the configured reference (``plan.cfg.reference``) once per seed; returns the failed runs' labels.

    With ``shard: K/N`` the reference seeds are split round-robin too, so N shards run each of them once.
    """
    from benchmark.shard import shard_slice

    name = getattr(plan.cfg, "reference", None)
    check_reference(name)
    failed = []
    for seed in shard_slice(list(plan.cfg.seeds), getattr(plan.cfg, "shard", None)) if name else []:
        rec = run_joint(plan, seed, base_path, out_dir, accelerator, quiet)
        if rec is not None and rec["status"] != "success":
            failed.append(f"{rec['run_id']} ({rec['error']})")
    return failed
