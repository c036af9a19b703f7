"""The stage loop: for each (method, seed): wrap the base model, then train -> evaluate, task after task.

The runner reaches methods and tasks only through their registries; it never branches on a method's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import TINY_WORLD, ExperimentConfig, build_dataclass
from benchmark.errors import UserError
from benchmark.evaluate import LM_EVAL_PREFIX, evaluate
from benchmark.checkpoint import preserved_rng
from benchmark.evalcache import EvalCache, eval_key, model_hash
from benchmark.locks import exclusive
from benchmark.paths import cache_dir, lock_path, safe_component
from benchmark.precision import autocast, resolve_precision

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
    precision: str = "fp32"  # train.precision resolved for this machine (benchmark/precision.py)

    def runs(self) -> list[tuple[str, int]]:
        """(method, seed) pairs in plan order; with ``shard: K/N`` only the K-th round-robin slice of them."""
        from benchmark.shard import shard_slice

        return shard_slice([(m, s) for m in self.cfg.methods for s in self.cfg.seeds], self.cfg.shard)


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
    if cfg.general is not None:  # --general: another suite for this run (the sequence id says so)
        import dataclasses

        from tasks import resolve_suite

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


def describe(plan: Plan) -> str:
    """The dry-run text: methods x seeds x stages."""
    steps = [stage_steps(plan, t) for t in plan.tasks]
    lines = [f"sequence {plan.sequence_id}: " + " -> ".join(f"{t.name}({s} steps)" for t, s in zip(plan.tasks, steps)),
             f"general suite: {', '.join([g.name for g in plan.general] + plan.general_builtin) or '(none)'}",
             f"model: {plan.cfg.model.name}",
             f"{len(plan.cfg.methods)} methods x {len(plan.cfg.seeds)} seeds x {len(plan.tasks)} stages "
             f"= {len(plan.runs())} runs, {len(plan.runs()) * len(plan.tasks)} stages"
             + (f" (shard {plan.cfg.shard} of the plan)" if plan.cfg.shard else "")]
    lines += [f"  run {m} seed {s}" for m, s in plan.runs()]
    if plan.cfg.reference:  # see benchmark/reference.py
        lines.append(f"  + reference {plan.cfg.reference}: one run per seed, one stage of {sum(steps)} steps")
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
    """The cached folder of tiny-world or a built-in model (built on first use), or None for a hub / local model."""
    from benchmark.builtin_models import ensure_builtin, is_builtin

    if is_builtin(plan.cfg.model.name):
        return ensure_builtin(plan.cfg.model.name)
    if plan.cfg.model.name != TINY_WORLD:
        return None
    from benchmark.models import tinyworld_path
    from tasks import SUITES, TASKS

    # the base is pretrained until it knows all the tiny-world facts (both halves: the test suite and the
    # validation suite), whatever suite this run reports, so tuning on validation and testing share one base
    facts = [TASKS.get(n) for suite in ("tiny-world", "tiny-world-val") for n in SUITES.get(suite).tasks]
    return tinyworld_path(plan.cfg.model.pretrain, facts, quiet=quiet)


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
    from benchmark.models import model_slug

    return safe_component(f"{method_label(plan, method_name)}--{model_slug(plan.cfg.model.name)}--"
                          f"{plan.sequence.name}--seed{seed}")


def _eval_settings(plan: Plan, model: Any) -> dict[str, Any]:
    device = next(model.parameters()).device.type
    suite = plan.sequence.general
    return {"batch_size": plan.cfg.eval.batch_size, "limit": plan.cfg.eval.limit,
            "num_fewshot": suite.num_fewshot, "fewshot": suite.fewshot, "metrics": suite.metrics,
            "chat_template": plan.cfg.model.chat_template, "device": device, "precision": plan.precision}


def _run_evaluate(plan: Plan, model: Any, tok: Any, log_samples: str = "none") -> Any:
    """:func:`benchmark.evaluate.evaluate` with the plan's tasks, suite settings and chat-template choice."""
    suite = plan.sequence.general
    with autocast(plan.precision, next(model.parameters()).device.type):  # evaluation computes as training did
        return evaluate(model, tok, plan.tasks + plan.general, plan.general_builtin,
                        batch_size=plan.cfg.eval.batch_size, limit=plan.cfg.eval.limit, num_fewshot=suite.num_fewshot,
                        fewshot=suite.fewshot, metrics=suite.metrics, include_path=suite.include_dir(),
                        apply_chat_template=plan.cfg.model.chat_template, log_samples=log_samples)


def _evaluate(plan: Plan, model: Any, tok: Any, model_key: str, out_dir: Path, label: str,
              what: str) -> dict[str, Any]:
    """Scores of ``model`` on every task (through the content-keyed cache), leaving the RNG streams untouched.

    With ``eval.log_samples`` on, the result also names its per-sample file (``samples``: a path relative to
    ``out_dir``, keyed like the cache entry; :mod:`benchmark.samples`). A cache hit without that file (an entry
    made with samples off, or before they existed) is evaluated again to write it; the cached scores are kept.
    """
    from benchmark.distributed import on_main
    from benchmark.samples import samples_candidates, write_samples

    mode = plan.cfg.eval.log_samples
    # eval.log_samples is not part of the key: samples never change a score, so both settings share entries
    key, parts = eval_key(model_key, plan.tasks + plan.general, plan.general_builtin, _eval_settings(plan, model))
    files = [] if mode == "none" else samples_candidates(out_dir, key, mode == "all" and bool(plan.general_builtin))

    def compute() -> dict[str, Any]:
        res = _run_evaluate(plan, model, tok, mode)
        seconds = res.seconds
        if files:
            t0 = time.perf_counter()
            write_samples(files[0], [row for rows in res.samples.values() for row in rows])
            seconds += time.perf_counter() - t0  # part of the evaluation's cost
        return {"scores": res.scores, "n_examples": res.n_examples, "seconds": seconds}

    def lookup() -> tuple[dict[str, Any], bool]:
        cache = EvalCache(cache_dir(out_dir))
        stale = cache.get(key, parts, label) if files and not any(f.is_file() for f in files) else None
        if stale is None:
            result, hit = cache.get_or_compute(key, parts, compute, label=label, what=what)
        else:
            logger.info("%s: cache hit %s-%s has no samples file; evaluating again to write it", what, label,
                        key[:12])
            fresh = compute()
            if fresh["scores"] != stale["scores"]:  # never seen: evaluation is deterministic on one machine
                logger.warning("%s: re-evaluation for samples gave other scores than cache entry %s-%s (%s vs %s); "
                               "keeping the cached scores", what, label, key[:12], fresh["scores"], stale["scores"])
            result, hit = {**stale, "seconds": fresh["seconds"]}, False
        if files:
            path = next((f for f in files if f.is_file()), files[0])
            result = {**result, "samples": path.relative_to(out_dir).as_posix()}
        return result, hit

    with preserved_rng():  # a cache hit and a fresh evaluation leave training in the same state
        # several processes: rank 0 evaluates (and writes the cache) while the others wait; all get its result
        result, hit = on_main(lookup)
    if hit:
        result = {**result, "seconds": 0.0}
    return result


def _rows(plan: Plan, result: dict[str, Any]) -> tuple[list[float], list[float]]:
    s = result["scores"]
    r = [s[t.name] for t in plan.tasks]
    g = [s[t.name] for t in plan.general] + [s[b[len(LM_EVAL_PREFIX):]] for b in plan.general_builtin]
    return r, g


def _eval_row(model: Any, tok: Any, plan: Plan) -> tuple[list[float], list[float], dict[str, int], float]:
    """A fresh (uncached) evaluation of every task: (R row, G row, examples per task, seconds)."""
    from benchmark.distributed import on_main

    with preserved_rng():
        res = on_main(lambda: _run_evaluate(plan, model, tok))
    r, g = _rows(plan, {"scores": res.scores})
    return r, g, res.n_examples, res.seconds


def base_evaluation(plan: Plan, model: Any, tok: Any, base_hash: str, out_dir: Path) -> dict[str, Any]:
    """Stage-0 row, keyed by the base model's weights: computed once, shared by every method and seed.

    ``base_hash`` is :func:`benchmark.evalcache.model_hash` of the base model; anything else (e.g. a path)
    is not trusted as a content key and the weights are hashed here.
    """
    if not (isinstance(base_hash, str) and len(base_hash) == 64 and all(c in "0123456789abcdef" for c in base_hash)):
        base_hash = model_hash(model)
    res = _evaluate(plan, model, tok, base_hash, out_dir, "base-eval", "base evaluation")
    r, g = _rows(plan, res)
    samples = {"samples": res["samples"]} if "samples" in res else {}  # absent with eval.log_samples: none
    return {"R0": r, "G0": g, "n_examples": res["n_examples"], "seconds": res["seconds"], **samples}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes; process-wide peak


def write_leaderboard(out_dir: Path) -> Any:
    """Rebuild scores and leaderboard under the directory's leaderboard lock (every file replaced atomically).

    Each process writes its run records before taking the lock, so the last rewrite sees every finished run.
    """
    from benchmark.leaderboard import write_all

    with exclusive(lock_path(out_dir, "leaderboard")):
        return write_all(out_dir)


def run_experiment(cfg: ExperimentConfig, quiet: bool = False, force: bool = False, plan: Plan | None = None) -> int:
    """Run the whole plan; returns the process exit code (1 when any run failed).

    ``plan`` is the result of :func:`benchmark.validate.validate` (done here when not given): nothing is
    written before the whole configuration has been checked.
    """
    from benchmark.distributed import make_accelerator
    from benchmark.stages import run_one
    from benchmark.validate import validate

    plan = plan if plan is not None else validate(cfg, force=force)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output)
    accelerator = make_accelerator()
    # rank 0 builds (or fetches) the base; the others then find it cached. Before the output folder exists, so a
    # failed fetch leaves nothing behind.
    with accelerator.main_process_first():
        base_path = base_model_path(plan, quiet)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for method_name, seed in plan.runs():
        rec = run_one(plan, method_name, seed, base_path, out_dir, accelerator, quiet=quiet, force=force)
        if rec is not None and rec["status"] != "success":
            failed.append(f"{rec['run_id']} ({rec['error']})")
    from benchmark.reference import run_references  # joint-training upper bound when cfg.reference is set

    failed += run_references(plan, base_path, out_dir, accelerator, quiet=quiet)
    if accelerator.is_main_process:
        df = write_leaderboard(out_dir)
        logger.info("wrote %s (%d leaderboard rows)", out_dir / "leaderboard.md", len(df))
    if failed:
        logger.error("%d of %d runs failed (records in %s): %s", len(failed), len(plan.runs()), out_dir / "runs",
                     "; ".join(failed))
    return 1 if failed else 0
