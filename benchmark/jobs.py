"""One run of a plan as a submitit job: its config and folder, the job's body, and the merge of job folders.

Job i runs the in-process path (:func:`benchmark.runner.run_experiment`) on run i of ``all_runs(plan)`` alone,
into ``OUTPUT/jobs/<run_id>/``, a complete results folder. Its config keeps every setting a run's numbers depend
on and narrows only ``methods``, ``seeds``, ``reference`` and ``shard`` (a reference run is picked by its id), so
the folder resumes like any output folder: a finished run is skipped, an unfinished one continues from its last
stage checkpoint. :func:`merge` rebuilds ``OUTPUT``'s leaderboard from every ``OUTPUT/jobs/*``, after giving each
job that ended without a run record (killed, out of time, crashed before its run began) a failed one, so that it
counts in ``n_failed``. :mod:`benchmark.launch` submits these jobs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.builtin_models import model_label, model_source
from benchmark.config import ExperimentConfig
from benchmark.locks import RunLock, exclusive
from benchmark.paths import lock_path, record_path, safe_component, under
from benchmark.progress import quiet_environment, silence_libraries
from benchmark.records import RunRecord, finished_result, read_record, write_record

if TYPE_CHECKING:  # the plan pulls in lm-eval and `datasets`, which a job may import only after its data setup
    from benchmark.plan import Plan

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NO_RECORD = "ended without a run record"  # in the error of the failed record merge() writes for such a job
NOISY_LOGGERS = ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate", "httpx", "urllib3")  # as the CLI


def configure_logging(level: int) -> None:
    """A job's log file: the CLI's format and level, the chatty libraries quiet unless debugging."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if level <= logging.DEBUG else logging.ERROR)


@dataclass(frozen=True)
class RunJob:
    """One run of the plan as a job: its folder, its config and what its numbers depend on."""

    run_id: str
    folder: str  # OUTPUT/jobs/<run_id>, absolute: a cluster job need not start where the command ran
    config: ExperimentConfig
    inputs: dict[str, Any]  # benchmark.plan.run_inputs: is the record in the folder this run, finished?
    stub: dict[str, Any]  # the identity of its record, for a failed one when the job leaves none


def plan_jobs(plan: Plan) -> list[RunJob]:
    """One job per run of ``all_runs(plan)`` (with ``shard``: this shard's), in plan order."""
    from benchmark.plan import run_inputs
    from benchmark.reference import all_runs

    cfg, out = plan.cfg, Path(plan.cfg.output).expanduser().resolve()
    jobs = []
    for run in all_runs(plan):
        folder = under(out, "jobs", safe_component(run.run_id))
        alone = run.kind == "method"  # a reference run keeps the methods only because a config needs some
        job_cfg = dataclasses.replace(cfg, output=str(folder), shard=None, seeds=[run.seed],
                                      methods=[run.method] if alone else list(cfg.methods),
                                      reference=None if alone else cfg.reference)
        stub = RunRecord(run_id=run.run_id, method=run.method, model=model_label(cfg.model.name),
                         model_source=model_source(cfg.model.name), sequence=plan.sequence.name,
                         sequence_id=plan.sequence_id, seed=run.seed, config=job_cfg.to_dict(),
                         method_config=run.method_config, precision=plan.precision, kind=run.kind,
                         tasks=[t.name for t in plan.tasks],
                         general_tasks=[g.name for g in plan.general] + plan.general_builtin)
        jobs.append(RunJob(run.run_id, str(folder), job_cfg, run_inputs(plan, run), stub.to_dict()))
    return jobs


def pending_jobs(plan: Plan, jobs: list[RunJob], force: bool) -> list[RunJob]:
    """The jobs still to run; a job folder holding its run made with other settings is refused (unless force)."""
    from benchmark.validate import check_existing

    for job in jobs:
        check_existing(dataclasses.replace(plan, cfg=job.config), force)
    return [j for j in jobs if force or finished_result(record_path(j.folder, j.run_id), j.inputs)[0] is None]


def run_job(cfg: ExperimentConfig, run_id: str, force: bool, log_level: int, distributed: bool) -> int:
    """The body of one job (pickled by reference): the in-process path on one run; returns its exit code."""
    quiet_environment()  # no progress bars in a log file: lm-eval's and the libraries' too, not only ours
    configure_logging(log_level)
    if distributed:  # before anything builds the Accelerator: RANK, WORLD_SIZE, MASTER_ADDR from the job's tasks
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    from benchmark.prepare import configure_data_env

    configure_data_env(cfg.data_dir, cfg.data_roots)  # before anything imports `datasets`
    silence_libraries()
    from benchmark.runner import run_experiment

    return run_experiment(cfg, quiet=True, force=force, only=run_id)


def job_outcome(job: Any) -> str:
    """How an ended submitit job ended, for the error of a failed record (SLURM: ``state`` asks sacct)."""
    task = job.task(0) if job.num_tasks > 1 else job  # rank 0 writes the record
    try:
        state = task.state
    except Exception:  # noqa: BLE001 -- sacct unreachable: the record still says the job left nothing
        state = "UNKNOWN"
    if not task.paths.result_pickle.exists():
        return f"state {state}, no result: killed, out of time or crashed"
    exc = task.exception()
    if exc is None:
        return f"state {state}"
    # submitit's message is the traceback between dashed lines, then where the logs are: keep its last line
    trace = str(exc).split("-" * 22)
    last = [ln.strip() for ln in (trace[1] if len(trace) > 2 else str(exc)).splitlines() if ln.strip()]
    return f"state {state}, raised {last[-1] if last else type(exc).__name__}"


def merge(output: str | Path, jobs: list[RunJob], outcomes: Mapping[str, tuple[str, str]]) -> list[RunRecord]:
    """Record each ended job that left no record as failed, then the leaderboard of ``OUTPUT/jobs/*`` in OUTPUT.

    ``outcomes``: run id -> (job id, :func:`job_outcome`) of the jobs that ran. Returns the records of ``jobs``.
    """
    from benchmark.leaderboard import write_all  # deferred: pandas, and matplotlib for the plots

    records = []
    for job in jobs:
        path = record_path(job.folder, job.run_id)
        rec = read_record(path)
        # a failed record written here for an earlier submission is replaced: the error names the latest job
        if job.run_id in outcomes and (rec is None or (NO_RECORD in (rec.error or "") and not rec.env)):
            with RunLock(lock_path(job.folder, job.run_id)) as lock:
                if not lock.acquire():  # a job of another submission is running it: its record will come
                    logger.warning("%s: no record yet, and another process is running it", job.run_id)
                    continue
                job_id, how = outcomes[job.run_id]
                rec = RunRecord.from_dict({**job.stub, "status": "failed", "failed_stage": 0,
                                           "error": f"job {job_id} {NO_RECORD} ({how})"})
                write_record(path, rec)
            logger.error("%s: %s", job.run_id, rec.error)
        if rec is not None:
            records.append(rec)
    dirs = sorted(p for p in Path(output, "jobs").glob("*") if (p / "runs").is_dir())
    with exclusive(lock_path(output, "leaderboard")):  # like runner.write_leaderboard: the last rewrite sees all
        write_all(output, dirs)
    return records


def merge_job(output: str, jobs: list[RunJob], submitted: dict[str, tuple[str, str]]) -> int:
    """The SLURM merge job, after every run job: ``submitted`` maps run id -> (job id, submitit folder)."""
    import submitit

    configure_logging(logging.INFO)
    outcomes = {rid: (jid, job_outcome(submitit.SlurmJob(folder, jid))) for rid, (jid, folder) in submitted.items()}
    return int(any(r.status != "success" for r in merge(output, jobs, outcomes)))
