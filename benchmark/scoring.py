"""Scoring a model for the stage loop: every task of the plan through lm-eval, via the evaluation cache.

:func:`cached_evaluation` evaluates a model (or finds its scores in the content-keyed cache), :func:`score_rows`
splits the scores into the R row (downstream tasks) and the G row (general suite), and :func:`base_evaluation`
gives the stage-0 row that every method and seed of a sweep shares.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.checkpoint import preserved_rng
from benchmark.distributed import on_main
from benchmark.evalcache import EvalCache, eval_key, is_model_hash, model_hash
from benchmark.evaluate import LM_EVAL_PREFIX, EvalResult, evaluate
from benchmark.paths import cache_dir
from benchmark.plan import Plan
from benchmark.precision import autocast, default_device_type
from benchmark.samples import samples_candidates, write_samples

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """One evaluation of every task of a plan: points per task, examples per task, seconds (0 on a cache hit),
    and the per-sample file relative to the results folder (None with ``eval.log_samples: none``)."""

    scores: dict[str, float]
    n_examples: dict[str, int]
    seconds: float
    samples: str | None = None


def eval_settings(plan: Plan, model: Any) -> dict[str, Any]:
    """Everything besides the model and the tasks that an evaluation's scores depend on (part of its cache key).

    ``model`` may be a function that builds the model (see :func:`cached_evaluation`): its device is then the
    run's device.
    """
    device = next(model.parameters()).device.type if isinstance(model, nn.Module) else default_device_type()
    suite = plan.sequence.general
    return {"batch_size": plan.cfg.eval.batch_size, "limit": plan.cfg.eval.limit,
            "num_fewshot": suite.num_fewshot, "fewshot": suite.fewshot, "metrics": suite.metrics,
            "chat_template": plan.cfg.model.chat_template, "device": device, "precision": plan.precision}


def evaluate_plan(plan: Plan, model: Any, tok: Any, log_samples: str = "none") -> EvalResult:
    """:func:`benchmark.evaluate.evaluate` with the plan's tasks, suite settings and chat-template choice."""
    suite = plan.sequence.general
    with autocast(plan.precision, next(model.parameters()).device.type):  # evaluation computes as training did
        return evaluate(model, tok, plan.tasks + plan.general, plan.general_builtin,
                        batch_size=plan.cfg.eval.batch_size, limit=plan.cfg.eval.limit, num_fewshot=suite.num_fewshot,
                        fewshot=suite.fewshot, metrics=suite.metrics, include_path=suite.include_dir(),
                        apply_chat_template=plan.cfg.model.chat_template, log_samples=log_samples)


def _model(model: Any) -> Any:
    """The model itself, or what the builder function passed instead returns (see :func:`cached_evaluation`)."""
    return model if isinstance(model, nn.Module) else model()


def _with_samples(res: EvalResult, files: list[Path]) -> dict[str, Any]:
    """The cache entry of an evaluation, after writing its samples file (whose writing counts as its cost)."""
    seconds = res.seconds
    if files:
        t0 = time.perf_counter()
        write_samples(files[0], [row for rows in res.samples.values() for row in rows])
        seconds += time.perf_counter() - t0
    return {"scores": res.scores, "n_examples": res.n_examples, "seconds": seconds}


def _samples_field(files: list[Path], out_dir: Path) -> dict[str, str]:
    """``{"samples": path relative to out_dir}`` of the samples file there is (else the one to write), or {}."""
    if not files:
        return {}
    return {"samples": next((f for f in files if f.is_file()), files[0]).relative_to(out_dir).as_posix()}


def cached_evaluation(plan: Plan, model: Any, tok: Any, model_key: str, out_dir: Path, label: str,
                      what: str) -> Scores:
    """Scores of ``model`` on every task (through the content-keyed cache), leaving the RNG streams untouched.

    ``model`` is the model, or a function that builds it (called only on a cache miss). With ``eval.log_samples``
    on, the result also names its per-sample file (a path relative to ``out_dir``, keyed like the cache entry;
    :mod:`benchmark.samples`). A cache hit without that file (an entry made with samples off, or before they
    existed) is evaluated again to write it; the cached scores are kept. Under ``train.sharding: fsdp`` a miss is
    evaluated by every process in lockstep on the sharded model (:func:`lockstep_evaluation`).
    """
    mode = plan.cfg.eval.log_samples
    # eval.log_samples is not part of the key: samples never change a score, so both settings share entries
    key, parts = eval_key(model_key, plan.tasks + plan.general, plan.general_builtin, eval_settings(plan, model))
    files = [] if mode == "none" else samples_candidates(out_dir, key, mode == "all" and bool(plan.general_builtin))
    if plan.cfg.train.sharding == "fsdp":
        with preserved_rng():
            result, hit = lockstep_evaluation(plan, model, tok, key, parts, files, out_dir, label, what)
        return Scores(result["scores"], result["n_examples"], 0.0 if hit else result["seconds"], result.get("samples"))

    def compute() -> dict[str, Any]:
        return _with_samples(evaluate_plan(plan, _model(model), tok, mode), files)

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
        return {**result, **_samples_field(files, out_dir)}, hit

    with preserved_rng():  # a cache hit and a fresh evaluation leave training in the same state
        # several processes: rank 0 evaluates (and writes the cache) while the others wait; all get its result
        result, hit = on_main(lookup)
    return Scores(result["scores"], result["n_examples"], 0.0 if hit else result["seconds"], result.get("samples"))


def lockstep_evaluation(plan: Plan, model: Any, tok: Any, key: str, parts: dict[str, Any], files: list[Path],
                        out_dir: Path, label: str, what: str) -> tuple[dict[str, Any], bool]:
    """(result, cache hit) for a sharded model: rank 0 looks the key up; on a miss every process evaluates.

    Each process runs the same lm-eval requests in the same order, so every forward gathers the same block on
    all of them (no process holds the whole model); rank 0 writes the samples file and the cache entry.
    """
    cache = EvalCache(cache_dir(out_dir))

    def find() -> dict[str, Any] | None:
        hit = cache.get(key, parts, label)
        if hit is None or (files and not any(f.is_file() for f in files)):
            return None  # a hit without its samples file is evaluated again, as in an unsharded run
        logger.info("%s: cache hit %s-%s", what, label, key[:12])
        return {**hit, **_samples_field(files, out_dir)}

    found = on_main(find)
    if found is not None:
        return found, True
    built = _model(model)
    res = evaluate_plan(plan, built, tok, plan.cfg.eval.log_samples)
    del built  # a base copy built for this evaluation is freed before training starts

    def store() -> dict[str, Any]:
        result = _with_samples(res, files)
        cache.put(key, parts, result, label)
        return {**result, **_samples_field(files, out_dir)}

    return on_main(store), False


def score_rows(plan: Plan, scores: dict[str, float]) -> tuple[list[float], list[float]]:
    """(R row: the downstream tasks in sequence order, G row: the general suite in suite order)."""
    r = [scores[t.name] for t in plan.tasks]
    g = [scores[t.name] for t in plan.general] + [scores[b[len(LM_EVAL_PREFIX):]] for b in plan.general_builtin]
    return r, g


def base_evaluation(plan: Plan, model: Any, tok: Any, base_hash: str, out_dir: Path) -> Scores:
    """Stage-0 scores, keyed by the base model's weights: computed once, shared by every method and seed.

    ``base_hash`` is :func:`benchmark.evalcache.model_hash` of the base model; anything else (e.g. a path)
    is not trusted as a content key and the weights are hashed here.
    """
    if not is_model_hash(base_hash):
        base_hash = model_hash(model)
    return cached_evaluation(plan, model, tok, base_hash, out_dir, "base-eval", "base evaluation")


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes; process-wide peak
