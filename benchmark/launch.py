"""``run --launcher local|slurm``: one submitit job per run of the plan (see :mod:`benchmark.jobs`), then a merge.

``local`` runs the jobs one after another on this machine, waits, and merges ``OUTPUT/jobs/*`` into ``OUTPUT``;
``slurm`` submits them, then a merge job that starts once all of them have ended (``afterany``), and returns.
Every check (sbatch on PATH, each ``--slurm-set`` name, the job folders' existing results) happens before the
first job folder is written. With ``--gpus-per-run G > 1`` a job is one node with G tasks, one per GPU, whose
processes form the data-parallel group of :mod:`benchmark.distributed`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.errors import UserError
from benchmark.jobs import RunJob, job_outcome, merge, merge_job, pending_jobs, plan_jobs, run_job
from benchmark.progress import quiet_children

if TYPE_CHECKING:  # the plan pulls in lm-eval; this module is imported before anything has checked the flags
    from benchmark.plan import Plan

logger = logging.getLogger(__name__)
SLURM_TIME_MIN = 240
MERGE_TIME_MIN = 60
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's LocalExecutor would stop a job after 2 minutes
SLURM_FLAGS = ("--slurm-partition", "--slurm-time", "--slurm-set")


@dataclass(frozen=True)
class LaunchOptions:
    """Where and with what the jobs run (``--launcher`` and its options, defaults filled in)."""

    launcher: str  # local or slurm
    partition: str | None = None
    gpus: int = 1  # per run; > 1: G tasks on one node, data-parallel
    time_min: int = SLURM_TIME_MIN
    extras: dict[str, Any] = field(default_factory=dict)  # --slurm-set: parameters of submitit's SlurmExecutor


def launch_options(launcher: str, partition: str | None, gpus: int | None, time_min: int | None,
                   sets: list[str] | None) -> LaunchOptions | None:
    """The checked options (None for ``--launcher none``); an option that would be ignored is an error."""
    given = dict(zip(SLURM_FLAGS, (partition, time_min, sets)))
    slurm_only = [flag for flag, value in given.items() if value is not None]
    if launcher != "slurm" and slurm_only:
        raise UserError(f"{slurm_only[0]} needs --launcher slurm" + (f", not {launcher}" if launcher != "none" else ""))
    if launcher == "none":
        if gpus is not None:
            raise UserError("--gpus-per-run needs --launcher slurm or local")
        return None
    if gpus is not None and gpus < 0:
        raise UserError(f"invalid --gpus-per-run {gpus}: must be 0 or more")
    if time_min is not None and time_min < 1:
        raise UserError(f"invalid --slurm-time {time_min}: minutes, at least 1")
    if launcher == "local" and gpus is not None and gpus > 1:
        import torch  # deferred: the flag checks come before anything heavy is imported

        if 0 < torch.cuda.device_count() < gpus:
            raise UserError(f"--gpus-per-run {gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    extras = dict(parse_set(s) for s in sets or [])
    opts = LaunchOptions(launcher, partition, 1 if gpus is None else gpus, time_min or SLURM_TIME_MIN, extras)
    if launcher == "slurm":  # sbatch on PATH and every --slurm-set valid: a SlurmExecutor writes nothing yet
        executor(opts, Path("submitit"), "check")
    return opts


def require_sbatch() -> None:
    """SLURM's submission command is on PATH (else one line, before anything else is checked or written)."""
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: SLURM's sbatch was not found on PATH (submit from a machine of the "
                        "cluster, or try the sweep here with --launcher local)")


def parse_set(item: str) -> tuple[str, Any]:
    """``mem=64G`` -> ``("mem", "64G")``: integers and true/false typed, ``[...]`` and ``{...}`` read as JSON."""
    key, sep, text = item.partition("=")
    key, text = key.strip().replace("-", "_"), text.strip()  # sbatch spells options with dashes, submitit not
    if not sep or not key:
        raise UserError(f"invalid --slurm-set {item!r}: expected KEY=VALUE, e.g. mem=64G or qos=high")
    if text.lstrip("-").isdigit():
        return key, int(text)
    if text.lower() in ("true", "false"):
        return key, text.lower() == "true"
    if text[:1] in ("[", "{"):
        try:
            return key, json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid --slurm-set {item!r}: not JSON ({exc.msg})") from exc
    return key, text


def executor(opts: LaunchOptions, folder: Path, name: str, merge_after: list[str] | None = None) -> Any:
    """The submitit executor of one job (``merge_after``: the merge job, after these job ids); errors: one line."""
    import submitit  # deferred: only a launcher needs it

    tasks = 1 if merge_after is not None else max(1, opts.gpus)
    if opts.launcher == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        # LocalExecutor sets CUDA_VISIBLE_DEVICES from its own GPU count: give the job what this process sees
        cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
        setup = ("export CUDA_VISIBLE_DEVICES=" if opts.gpus == 0 else
                 "unset CUDA_VISIBLE_DEVICES" if cuda is None else f"export CUDA_VISIBLE_DEVICES={shlex.quote(cuda)}")
        ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, name=name, tasks_per_node=tasks, local_setup=[setup])
        return ex
    require_sbatch()
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as exc:  # sbatch without srun
        raise UserError(f"--launcher slurm: {str(exc).splitlines()[0]}") from exc
    gpus = {"gpus_per_node": opts.gpus} if opts.gpus and merge_after is None else {}
    ex.update_parameters(name=name, nodes=1, tasks_per_node=tasks, **gpus,
                         timeout_min=MERGE_TIME_MIN if merge_after is not None else opts.time_min,
                         **({"slurm_partition": opts.partition} if opts.partition else {}))
    for key, value in opts.extras.items():  # one at a time, so that an error names the value at fault
        try:
            ex.update_parameters(**{f"slurm_{key}": value})
        except (NameError, ValueError, TypeError, AssertionError) as exc:
            raise UserError(f"invalid --slurm-set {key}={value}: {str(exc).splitlines()[0]}") from exc
    if merge_after:
        ex.update_parameters(slurm_dependency="afterany:" + ":".join(merge_after))
    return ex


def submit(ex: Any, label: str, submitted: dict[str, tuple[str, str]], fn: Any, *args: Any) -> Any:
    """``ex.submit(fn, *args)``; sbatch refusing a job (e.g. a partition it does not know) is one line."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal: it is in ours
            return ex.submit(fn, *args)
    except (FailedJobError, FailedSubmissionError) as exc:
        done = ", ".join(jid for jid, _ in submitted.values())
        again = f"; already submitted: {done} (scancel them, or let them run: a rerun skips finished runs)"
        raise UserError(f"sbatch refused the job of {label}: {' '.join(str(exc).split())[:300]}"
                        + (again if done else "")) from exc


def prepare(plan: Plan, opts: LaunchOptions, force: bool) -> tuple[Path, list[RunJob], list[RunJob]]:
    """(OUTPUT, every job, the jobs still to run), after checking the job folders (the flags: launch_options)."""
    out = Path(plan.cfg.output).expanduser().resolve()
    jobs = plan_jobs(plan)
    return out, jobs, pending_jobs(plan, jobs, force)


def describe_jobs(plan: Plan, opts: LaunchOptions, force: bool) -> str:
    """The dry-run text of the jobs: which runs would be submitted, where each writes, and the merge."""
    out, jobs, pending = prepare(plan, opts, force)
    how = "one after another on this machine" if opts.launcher == "local" else (
        f"on SLURM (partition {opts.partition or '(default)'}, {opts.time_min} min"
        + "".join(f", {k}={v}" for k, v in opts.extras.items()) + ")")
    how += f", {opts.gpus} GPU(s) and {max(1, opts.gpus)} process(es) per run"
    lines = [f"launcher {opts.launcher}: {len(pending)} of {len(jobs)} runs as jobs, {how}"]
    lines += [f"  job {j.run_id} -> {j.folder}/" + ("" if j in pending else " (finished: not submitted)")
              for j in jobs]
    lines.append(f"  then merge {out / 'jobs'}/* -> {out / 'leaderboard.md'}"
                 + (" (a SLURM job after all of them: afterany)" if opts.launcher == "slurm" and pending else ""))
    return "\n".join(lines)


def sweep(plan: Plan, opts: LaunchOptions, force: bool, log_level: int) -> tuple[int, str]:
    """Run (local) or submit (slurm) one job per run of ``plan``; returns the exit code and a summary line."""
    out, jobs, pending = prepare(plan, opts, force)
    submitted: dict[str, tuple[str, str]] = {}
    outcomes: dict[str, tuple[str, str]] = {}
    for job in pending:
        folder = Path(job.folder) / "submitit"
        with quiet_children():  # a job writes a log file: no progress bars there
            sub = submit(executor(opts, folder, job.run_id), job.run_id, submitted, run_job, job.config, job.run_id,
                         force, log_level, opts.gpus > 1)
        logger.info("job %s: %s -> %s", sub.job_id, job.run_id, job.folder)
        submitted[job.run_id] = (sub.job_id, str(folder))
        if opts.launcher == "local":  # one at a time: a run already uses the cores it is given
            try:
                sub.wait()
            except KeyboardInterrupt:
                sub.cancel()
                raise
            outcomes[job.run_id] = (sub.job_id, job_outcome(sub))
    if opts.launcher == "slurm" and pending:
        ids = [jid for jid, _ in submitted.values()]
        merger = executor(opts, out / "submitit", "forgetbench-merge", merge_after=ids)
        job_id = submit(merger, "the merge", submitted, merge_job, str(out), jobs, submitted).job_id
        return 0, (f"submitted {len(ids)} jobs ({', '.join(ids)}) and merge job {job_id} (afterany); to merge by "
                   f"hand: python -m benchmark leaderboard --results {out}/jobs/* --output {out}")
    failed = [r.run_id for r in merge(out, jobs, outcomes) if r.status != "success"]
    return int(bool(failed)), (f"{len(pending)} jobs run, {len(jobs) - len(pending)} already finished, "
                               f"{len(failed)} failed -> {out / 'leaderboard.md'} (merged from {out / 'jobs'}/*)")
