"""The stage loop: for each (method, seed): wrap the base model, then train -> evaluate, task after task.

The runner reaches methods and tasks only through their registries; it never branches on a method's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import TINY_WORLD, ExperimentConfig, build_dataclass
from benchmark.errors import UserError
from benchmark.evaluate import LM_EVAL_PREFIX, evaluate
from benchmark.records import environment, git_info, read_json, write_json

logger = logging.getLogger(__name__)


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

    def runs(self) -> list[tuple[str, int]]:
        return [(m, s) for m in self.cfg.methods for s in self.cfg.seeds]


def sequence_id(seq: Any, tasks: list[Any], general: list[Any], builtin: list[str]) -> str:
    """``name@hash``: the hash covers the ordered task list, step counts, data files and the general suite."""
    h = hashlib.sha256()
    h.update(json.dumps({"tasks": seq.tasks, "steps": seq.steps, "builtin": builtin}, sort_keys=True).encode())
    for spec in tasks + general:
        h.update(spec.content_hash().encode())
    return f"{seq.name}@{h.hexdigest()[:10]}"


def make_plan(cfg: ExperimentConfig) -> Plan:
    """Resolve names and build every method config; raises :class:`UserError` on any bad input."""
    from methods import METHODS
    from tasks import SEQUENCES, TASKS

    seq = SEQUENCES.get(cfg.sequence)
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
    plan = Plan(cfg, seq, sequence_id(seq, tasks, general, builtin), tasks, general, builtin)
    unknown = set(cfg.method_options) - set(METHODS.names())
    if unknown:
        METHODS.get(sorted(unknown)[0])  # raises the did-you-mean error
    for name in cfg.methods:
        cls = METHODS.get(name)
        opts = cfg.method_options.get(name, {})
        plan.methods[name] = (cls, build_dataclass(cls.config_cls, opts, f"methods.{name}."))
    return plan


def describe(plan: Plan) -> str:
    """The dry-run text: methods x seeds x stages."""
    steps = [stage_steps(plan, t) for t in plan.tasks]
    lines = [f"sequence {plan.sequence_id}: " + " -> ".join(f"{t.name}({s} steps)" for t, s in zip(plan.tasks, steps)),
             f"general suite: {', '.join([g.name for g in plan.general] + plan.general_builtin) or '(none)'}",
             f"model: {plan.cfg.model.name}",
             f"{len(plan.cfg.methods)} methods x {len(plan.cfg.seeds)} seeds x {len(plan.tasks)} stages "
             f"= {len(plan.runs())} runs, {len(plan.runs()) * len(plan.tasks)} stages"]
    lines += [f"  run {m} seed {s}" for m, s in plan.runs()]
    return "\n".join(lines)


def stage_steps(plan: Plan, task: Any) -> int:
    steps = plan.sequence.steps.get(task.name, task.train_steps)
    steps = max(1, round(steps * plan.cfg.train.steps_scale))
    return min(steps, plan.cfg.train.max_steps) if plan.cfg.train.max_steps else steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_model_path(plan: Plan, quiet: bool) -> Path | None:
    """The tiny-world cache directory (built on first use), or None for a hub / local model."""
    if plan.cfg.model.name != TINY_WORLD:
        return None
    from benchmark.models import tinyworld_path

    return tinyworld_path(plan.cfg.model.pretrain, plan.general, quiet=quiet)


def _eval_row(model: Any, tok: Any, plan: Plan) -> tuple[list[float], list[float], dict[str, int], float]:
    res = evaluate(model, tok, plan.tasks + plan.general, plan.general_builtin, batch_size=plan.cfg.eval.batch_size,
                   limit=plan.cfg.eval.limit, num_fewshot=plan.sequence.general.num_fewshot)
    r = [res.scores[t.name] for t in plan.tasks]
    g = [res.scores[t.name] for t in plan.general] + [res.scores[b[len(LM_EVAL_PREFIX):]] for b in plan.general_builtin]
    return r, g, res.n_examples, res.seconds


def base_evaluation(plan: Plan, model: Any, tok: Any, model_key: str, out_dir: Path) -> dict[str, Any]:
    """Stage-0 row, computed once per (base model, tasks, suite, eval settings) and shared by all runs."""
    import lm_eval

    key_src = json.dumps({"model": model_key, "seq": plan.sequence_id, "eval": plan.cfg.eval.__dict__,
                          "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?"}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = out_dir / "cache" / f"base-eval-{key}.json"
    if path.is_file():
        logger.info("base evaluation: cache hit %s", path.name)
        return read_json(path)
    r, g, n, secs = _eval_row(model, tok, plan)
    data = {"key": key, "R0": r, "G0": g, "n_examples": n, "seconds": secs}
    write_json(path, data)
    return data


def run_one(plan: Plan, method_name: str, seed: int, base_path: Path | None, out_dir: Path, accelerator: Any,
            quiet: bool = False) -> dict[str, Any]:
    """One (method, seed) run over the whole sequence; returns its record (status success or failed)."""
    from benchmark.data import encode_task
    from benchmark.models import load_base, model_slug
    from benchmark.train import train_stage
    from methods.base import TaskInfo

    cfg = plan.cfg
    cls, mcfg = plan.methods[method_name]
    run_id = f"{method_name}--{model_slug(cfg.model.name)}--{plan.sequence.name}--seed{seed}"
    rec: dict[str, Any] = {
        "schema_version": "1.0", "run_id": run_id, "method": method_name, "model": cfg.model.name,
        "sequence": plan.sequence.name, "sequence_id": plan.sequence_id, "seed": seed, "status": "running",
        "error": None, "config": cfg.to_dict(), "method_config": mcfg.to_dict(),
        "tasks": [t.name for t in plan.tasks], "general_tasks": [g.name for g in plan.general] + plan.general_builtin,
        "general_chance": [g.chance for g in plan.general] + [0.0] * len(plan.general_builtin),
        "metric_names": {t.name: ("acc" if t.output_type == "multiple_choice" else "exact_match")
                         for t in plan.tasks + plan.general},
        "git": git_info(), "env": environment(), "R": [], "G": [], "stages": [], "diagnostics": [],
    }
    t_start = time.perf_counter()
    try:
        seed_everything(seed)
        model, tok = load_base(cfg.model, base_path)
        model.to(accelerator.device)
        base = base_evaluation(plan, model, tok, str(base_path or cfg.model.name), out_dir)
        rec["R"].append(base["R0"])
        rec["G"].append(base["G0"])
        rec["n_examples"] = base["n_examples"]
        method = cls(mcfg)
        model = method.wrap(model)
        rec["costs"] = {f"{k}_params": v for k, v in method.param_counts(model).items()}
        rec["diagnostics"].append({"stage": 0, **method.diagnostics(model)})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        lr = mcfg.lr if mcfg.lr is not None else cfg.train.lr
        gen = torch.Generator().manual_seed(seed)
        for i, task in enumerate(plan.tasks, start=1):
            info = TaskInfo(name=task.name, kind=task.kind, stage=i, num_stages=len(plan.tasks))
            method.on_task_start(model, info)
            examples = encode_task(task, tok, cfg.train.max_seq_len)
            stats = train_stage(model, method, examples, stage_steps(plan, task), cfg.train, lr, gen,
                                tok.pad_token_id, accelerator, desc=f"{method_name} s{seed} {task.name}", quiet=quiet)
            method.on_task_end(model, info)
            r, g, _, eval_s = _eval_row(method.eval_model(model), tok, plan)
            rec["R"].append(r)
            rec["G"].append(g)
            rec["stages"].append({"stage": i, "task": task.name, "steps": stats.steps, "train_seconds": stats.seconds,
                                  "eval_seconds": eval_s, "final_loss": stats.final_loss, "tokens": stats.tokens})
            rec["diagnostics"].append({"stage": i, **method.diagnostics(model)})
            logger.info("[%s seed %d] stage %d/%d %s: loss %.3f | %s | general %.1f (base %.1f) | %.0fs train, %.0fs eval",
                        method_name, seed, i, len(plan.tasks), task.name, stats.final_loss,
                        " ".join(f"{t.name}={v:.1f}" for t, v in zip(plan.tasks, r)),
                        float(np.mean(g)) if g else float("nan"), float(np.mean(rec["G"][0])) if g else float("nan"),
                        stats.seconds, eval_s)
        rec["status"] = "success"
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # isolate the failure: record it and let the other runs go on
        logger.error("[%s seed %d] failed: %s", method_name, seed, exc)
        rec["status"], rec["error"] = "failed", f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()
    rec.setdefault("costs", {})
    rec["costs"]["train_seconds"] = sum(s["train_seconds"] for s in rec["stages"])
    rec["costs"]["eval_seconds"] = sum(s["eval_seconds"] for s in rec["stages"])
    rec["costs"]["wall_seconds"] = time.perf_counter() - t_start
    rec["costs"]["peak_memory_mb"] = _peak_memory_mb()
    write_json(out_dir / "runs" / f"{run_id}.json", rec)
    return rec


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes; process-wide peak


def run_experiment(cfg: ExperimentConfig, quiet: bool = False) -> int:
    """Run the whole plan; returns the process exit code (1 when any run failed)."""
    from accelerate import Accelerator

    from benchmark.leaderboard import write_all

    plan = make_plan(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    base_path = base_model_path(plan, quiet)
    failed = 0
    for method_name, seed in plan.runs():
        rec = run_one(plan, method_name, seed, base_path, out_dir, accelerator, quiet=quiet)
        failed += rec["status"] != "success"
    df = write_all(out_dir)
    logger.info("wrote %s (%d leaderboard rows)", out_dir / "leaderboard.md", len(df))
    if failed:
        logger.error("%d of %d runs failed; see their records in %s", failed, len(plan.runs()), out_dir / "runs")
    return 1 if failed else 0
