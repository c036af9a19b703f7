"""Re-scoring kept weights (``python -m benchmark evaluate``): a results folder's runs on another suite, untrained.

For every successful run of the folder whose weights were kept (:mod:`benchmark.weights`), the model is rebuilt
the way the stage loop builds it -- the run's plan from its recorded config, ``load_base``, ``method.wrap``, the
precision policy, ``method.load_trainable_state`` -- and evaluated through the evaluation cache
(:func:`benchmark.scoring.cached_evaluation`: a repeat is a cache hit, and a cache hit loads no weights). The
scores go into the record's ``extra_general`` under the suite's name (:class:`benchmark.records.ExtraSuite`);
R and G are never touched. The base model (stage 0) is always scored too, so deltas on the new suite are defined;
the trained stages scored are those kept (``--stages final``: the last one only). Then the leaderboard is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark import weights
from benchmark.config import ExperimentConfig, build_dataclass
from benchmark.errors import UserError
from benchmark.evalcache import model_hash, stage_model_key
from benchmark.evaluate import LM_EVAL_PREFIX, all_included, spec_metric
from benchmark.locks import RunLock
from benchmark.models import load_base, load_tokenizer, prepare_for_training
from benchmark.paths import lock_path, record_path
from benchmark.plan import Plan, RunPlan, make_plan
from benchmark.precision import apply_policy, default_device_type
from benchmark.records import ExtraSuite, RunRecord, load_records, read_record, record_precision, write_record
from benchmark.reference import all_runs
from benchmark.runner import base_model_path, write_leaderboard
from benchmark.scoring import cached_evaluation, score_rows
from tasks import TASKS, GeneralSuite, resolve_suite
from tasks.floors import task_floor

logger = logging.getLogger(__name__)
STAGES = ("final", "all")


@dataclass(frozen=True)
class Request:
    """What ``evaluate`` re-scores: the folder, the suite (named ``name`` in the records), which kept stages."""

    results: Path
    suite: GeneralSuite
    name: str
    stages: str = "all"


@dataclass
class Summary:
    """What ``evaluate`` did: runs re-scored, evaluations computed and served from the cache, runs skipped."""

    rescored: list[str] = field(default_factory=list)
    evaluated: int = 0
    cached: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error


class SkipRun(Exception):
    """This run cannot be re-scored (reported, the others go on)."""


def make_request(results: str, general: str | None, tasks: list[str] | None, stages: str = "all") -> Request:
    """Check the command line before anything is loaded or written; raises :class:`UserError`."""
    folder = Path(results).expanduser()
    if not folder.is_dir():
        raise UserError(f"results directory not found: {results!r}")
    if not (folder / "runs").is_dir():
        raise UserError(f"not a results directory (no runs/ folder): {results!r}")
    if stages not in STAGES:
        raise UserError(f"invalid --stages {stages!r}; valid: {', '.join(STAGES)}")
    if general is None and not tasks:
        raise UserError("evaluate needs a suite to score: --general SUITE (see `ls suites`) and/or --tasks T1,T2")
    suite = resolve_suite(general) if general is not None else GeneralSuite()
    extra = [t for t in dict.fromkeys(tasks or []) if t not in suite.tasks]
    name = "+".join(([suite.name or Path(general).stem] if general is not None else []) + extra)
    suite = dataclasses.replace(suite, tasks=suite.tasks + extra, name=name)
    for spec in local_specs(suite):
        for split in spec.data:
            if not spec.path(split).is_file():
                raise UserError(f"task {spec.name!r}: {split} data file not found: {str(spec.path(split))!r}")
    builtin = [n[len(LM_EVAL_PREFIX):] for n in suite.tasks if n.startswith(LM_EVAL_PREFIX)]
    if builtin:
        check_lm_eval_tasks(builtin, suite.include_dir())
    return Request(folder, suite, name, stages)


def check_lm_eval_tasks(names: list[str], include_path: str | None) -> None:
    """Every name is one of lm-eval's tasks or groups (or defined under the suite's include path)."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import, its index seconds to build

    manager = TaskManager(include_path=include_path, include_defaults=not all_included(names, include_path))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(LM_EVAL_PREFIX + n for n in unknown)}")


def local_specs(suite: GeneralSuite) -> list[Any]:
    """The suite's own task specs (``TASKS.get`` raises a one-line error for an unknown name)."""
    return [TASKS.get(n) for n in suite.tasks if not n.startswith(LM_EVAL_PREFIX)]


def suite_id(suite: GeneralSuite, specs: list[Any]) -> str:
    """``name@hash`` over the task list and every local task's content (as a sequence id)."""
    h = hashlib.sha256(json.dumps(suite.tasks).encode())
    for spec in specs:
        h.update(spec.content_hash().encode())
    return f"{suite.name}@{h.hexdigest()[:10]}"


def rescore(req: Request) -> Summary:
    """Re-score every run of ``req.results`` on ``req.suite``, then rebuild the leaderboard."""
    out, summary = req.results, Summary()
    for rec in sorted(load_records([out]), key=lambda r: r.run_id):
        lock = RunLock(lock_path(out, rec.run_id))
        if not lock.acquire():
            summary.skipped[rec.run_id] = "another process is running it"
            continue
        try:
            entry = rescore_run(rec, req, summary)
            fresh = read_record(record_path(out, rec.run_id)) or rec  # as on disk now, under the run's lock
            fresh.extra_general[req.name] = merged(fresh.extra_general.get(req.name), entry)
            write_record(record_path(out, rec.run_id), fresh)
            summary.rescored.append(rec.run_id)
        except (SkipRun, UserError) as exc:  # the command line was checked before: this is about one run
            summary.skipped[rec.run_id] = str(exc)
        except Exception as exc:  # one run's failure (a damaged file, out of memory) leaves the others to go on
            summary.failed[rec.run_id] = f"{type(exc).__name__}: {exc}"
        finally:
            lock.release()
    for run_id, why in summary.skipped.items():
        logger.warning("%s: skipped: %s", run_id, why)
    for run_id, err in summary.failed.items():
        logger.error("%s: re-scoring failed: %s", run_id, err)
    if summary.rescored:
        write_leaderboard(out)
    return summary


def chosen_stages(rec: RunRecord, req: Request) -> list[int]:
    """The trained stages of ``rec`` to score: the kept ones (``--stages final``: the last stage only)."""
    if rec.status != "success":
        raise SkipRun(f"run status is {rec.status!r}")
    final = len(rec.stages)
    kept = [s for s in weights.kept_stages(req.results, rec.run_id) if s in (rec.kept_weights or [])]
    if not kept:
        raise SkipRun("no kept weights (run with --keep-weights final or all)")
    if req.stages == "final":
        if final not in kept:
            raise SkipRun(f"the weights of its final stage ({final}) were not kept")
        kept = [final]
    if kept != list(range(1, final + 1)):
        logger.info("%s: weights kept for stage(s) %s of %d only: re-scoring the base model and stage(s) %s",
                    rec.run_id, ",".join(map(str, kept)), final, ",".join(map(str, kept)))
    return kept


def run_plan(rec: RunRecord, req: Request) -> tuple[Plan, RunPlan]:
    """(the re-scoring plan: the run's settings, the new suite, no downstream task; the run as planned)."""
    try:
        cfg = build_dataclass(ExperimentConfig, {**rec.config, "shard": None})
        plan = make_plan(cfg)
    except UserError as exc:
        raise SkipRun(f"its recorded config no longer builds a plan: {exc}") from exc
    run = next((r for r in all_runs(plan) if r.run_id == rec.run_id), None)
    if run is None or run.method_config != rec.method_config:
        raise SkipRun("its recorded config no longer plans this run with the same method config")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sharding="none"))  # scored unsharded
    specs = local_specs(req.suite)
    rescoring = dataclasses.replace(
        plan, cfg=cfg, sequence=dataclasses.replace(plan.sequence, general=req.suite), tasks=[], general=specs,
        general_builtin=[n for n in req.suite.tasks if n.startswith(LM_EVAL_PREFIX)],
        precision=record_precision(rec) or plan.precision)
    return rescoring, run


def rescore_run(rec: RunRecord, req: Request, summary: Summary) -> ExtraSuite:
    """The new suite's rows of one run: stage 0 (the base model) and every chosen stage."""
    stages = chosen_stages(rec, req)
    base_hash = rec.base_model_hash
    if base_hash is None:
        raise SkipRun("its record has no base_model_hash (made before schema 1.2)")
    plan, run = run_plan(rec, req)
    base_path = base_model_path(plan, quiet=True)
    tok = load_tokenizer(plan.cfg.model, base_path)  # no weights: a cache hit loads none

    def base() -> Any:
        model, _ = load_base(plan.cfg.model, base_path, plan.precision)
        if model_hash(model) != base_hash:
            raise SkipRun("the base model's weights differ from those the run started from")
        model.to(default_device_type())
        return prepare_for_training(model, plan.cfg.train.gradient_checkpointing)  # as the stage loop has it

    models: list[tuple[Any, str, str]] = [(base, base_hash, "base-eval")]  # (model or builder, key, cache label)
    for stage in stages:
        state, info = weights.load(req.results, rec.run_id, stage)
        key = stage_model_key(base_hash, run.cls, run.method_config, state)
        if key != info.model_key:
            logger.warning("%s stage %d: the kept weights give model key %s, the run recorded %s (the method's "
                           "code changed since?); scoring them under the new key", rec.run_id, stage, key[:12],
                           str(info.model_key)[:12])
        models.append((trained(run, plan, base, base_hash, state, key), key, "eval"))
    rows, n_examples = [], {}
    for stage, (model, key, label) in zip([0] + stages, models):
        res = cached_evaluation(plan, model, tok, key, req.results, label, f"{rec.run_id} stage {stage} on {req.name}")
        if res.seconds == 0.0:  # cached_evaluation's mark of a cache hit
            summary.cached += 1
        else:
            summary.evaluated += 1
        rows.append(score_rows(plan, res.scores)[1])
        n_examples.update(res.n_examples)
    specs = plan.general
    return ExtraSuite(suite_id=suite_id(req.suite, specs), tasks=[s.name for s in specs] + plan.general_builtin,
                      floor=[task_floor(s) for s in specs] + [None] * len(plan.general_builtin),
                      metric_names={s.name: spec_metric(s) for s in specs}, stages=[0] + stages, G=rows,
                      model_keys=[key for _, key, _ in models], n_examples=n_examples)


def trained(run: RunPlan, plan: Plan, base: Callable[[], Any], base_hash: str, state: dict[str, Any],
            key: str) -> Callable[[], Any]:
    """A builder of the model after a stage (called on a cache miss only): base, wrap, policy, kept state."""

    def build() -> Any:
        method = run.cls(run.config)
        model = method.wrap(base())
        apply_policy(model, plan.precision)  # the dtypes training gave the trainable state, before loading it
        method.load_trainable_state(model, state)
        reloaded = method.trainable_state(model)
        if stage_model_key(base_hash, run.cls, run.method_config, reloaded) != key:
            raise RuntimeError("the reloaded model does not hold the kept weights (trainable_state differs)")
        return method.eval_model(model)

    return build


def merged(old: ExtraSuite | None, new: ExtraSuite) -> ExtraSuite:
    """``new``, plus the stages of ``old`` it does not score, when both are the same version of the suite."""
    if old is None or old.suite_id != new.suite_id or old.tasks != new.tasks:
        return new
    by_stage = {s: (g, k) for s, g, k in zip(old.stages, old.G, old.model_keys)}
    by_stage.update({s: (g, k) for s, g, k in zip(new.stages, new.G, new.model_keys)})
    stages = sorted(by_stage)
    return dataclasses.replace(new, stages=stages, G=[by_stage[s][0] for s in stages],
                               model_keys=[by_stage[s][1] for s in stages])
