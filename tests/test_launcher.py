"""``run --launcher local|slurm``: one submitit job per run, each into its own folder, and the merged leaderboard.

The local launcher runs for real (submitit's LocalExecutor, one job after another, each a fresh process); the
SLURM launcher is checked against a fake ``sbatch`` (and ``srun``, ``sacct``) on PATH that records what it gets.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from submitit.core.utils import DelayedSubmission

from benchmark import launch
from benchmark.cli import main
from tests.conftest import TINY_RUN

SETS = [a for s in TINY_RUN + ["eval.limit=2"] for a in ("--set", s)]
FULL, LORA = "full_ft--tiny-world--tiny-world--seed0", "lora--tiny-world--tiny-world--seed0"
JOINT = "joint_reference--tiny-world--tiny-world--seed0"
FAKE_SBATCH = """#!/bin/sh
# records its arguments and a copy of the script, answers like sbatch with 4242, 4243, ...
d="$(dirname "$0")"
if grep -q -- '--partition=nope' "$1"; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
n=$(cat "$d/count" 2>/dev/null || echo 0)
echo $((n + 1)) > "$d/count"
echo "$@" >> "$d/sbatch.args"
cp "$1" "$d/script.$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
# what sacct says of every job: it ran out of time (header line, then JobID|State|NodeList rows)
FAKE_SACCT = """#!/bin/sh
echo 'JobID|State|NodeList'
for i in $(seq 4242 4260); do echo "$i|TIMEOUT|node1"; done
"""


def _record(folder: Path, run_id: str) -> dict:
    return json.loads((folder / "runs" / f"{run_id}.json").read_text())


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin folder with fake sbatch, srun and sacct, first on PATH; returns it (sbatch's records land there)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n"), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_local_launcher_runs_one_job_per_run_merges_and_resumes(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    argv = ["run", "--methods", "full_ft,lora", "--reference", "joint", "--output", str(out), *SETS,
            "--launcher", "local"]
    assert main(argv + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "launcher local: 3 of 3 runs as jobs" in text and f"job {JOINT} -> {out / 'jobs' / JOINT}/" in text
    assert not out.exists(), "a dry run writes nothing"

    assert main(argv) == 0
    assert "3 jobs run, 0 already finished, 0 failed" in capsys.readouterr().out
    for run_id in (FULL, LORA, JOINT):
        folder = out / "jobs" / run_id
        rec = _record(folder, run_id)
        assert rec["status"] == "success", rec["error"]
        assert rec["config"]["output"] == str(folder) and rec["config"]["seeds"] == [0]
        assert (folder / "leaderboard.csv").is_file() and list((folder / "submitit").glob("*_0_log.out"))
        assert [p.name for p in (folder / "runs").glob("*.json")] == [f"{run_id}.json"], "one run per job"
    assert _record(out / "jobs" / FULL, FULL)["config"]["methods"] == ["full_ft"]
    assert _record(out / "jobs" / JOINT, JOINT)["kind"] == "reference"
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert sorted(board.index) == ["full_ft", "joint_reference", "lora"]
    assert list(board["n_seeds"]) == [1, 1, 1] and list(board["n_failed"]) == [0, 0, 0]
    assert pd.notna(board.loc["full_ft", "intransigence"]), "the reference run is merged in"

    # the same command again: every run is finished, so nothing is submitted; the leaderboard is rewritten
    pickles = sorted(p.name for p in out.glob("jobs/*/submitit/*_submitted.pkl"))
    assert main(argv) == 0
    assert "0 jobs run, 3 already finished, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("jobs/*/submitit/*_submitted.pkl")) == pickles


def test_a_job_that_dies_or_raises_without_a_record_counts_as_failed(tmp_path, cache_dir, monkeypatch, capsys):
    def broken_job(cfg, run_id, force, log_level, distributed):  # pickled by value into each job's process
        if run_id.startswith("full_ft"):
            os._exit(3)  # killed: no result, no record
        raise RuntimeError("boom before the run began")

    monkeypatch.setattr(launch, "run_job", broken_job)
    out = tmp_path / "out"
    argv = ["run", "--methods", "full_ft,lora", "--output", str(out), *SETS, "--launcher", "local"]
    assert main(argv) == 1
    assert "2 jobs run, 0 already finished, 2 failed" in capsys.readouterr().out
    died, raised = _record(out / "jobs" / FULL, FULL), _record(out / "jobs" / LORA, LORA)
    assert died["status"] == raised["status"] == "failed"
    assert "ended without a run record" in died["error"] and "no result: killed" in died["error"], died["error"]
    assert "raised RuntimeError: boom before the run began" in raised["error"], raised["error"]
    assert raised["sequence_id"].startswith("tiny-world@") and raised["method_config"]["r"] == 8
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert list(board.loc[["full_ft", "lora"], "n_failed"]) == [1, 1]
    assert list(board.loc[["full_ft", "lora"], "n_seeds"]) == [0, 0]
    # a failed record is not a finished run: the same command would submit both again
    assert main(argv + ["--dry-run"]) == 0
    assert "launcher local: 2 of 2 runs as jobs" in capsys.readouterr().out


def test_shard_picks_the_runs_and_each_becomes_a_job(tmp_path, capsys):
    argv = ["run", "--methods", "full_ft,lora", "--seeds", "0,1", "--reference", "joint", "--shard", "1/2",
            "--output", str(tmp_path / "out"), "--launcher", "local", "--dry-run"]
    assert main(argv) == 0
    jobs = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  job ")]
    assert jobs == [FULL, LORA, JOINT]  # (full_ft, 0), (lora, 0) of the four pairs; reference seed 0 of 0,1


def test_slurm_submits_one_job_per_run_then_a_merge_job_after_them(tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    argv = ["run", "--methods", "full_ft,lora", "--reference", "joint", "--output", str(out), *SETS,
            "--launcher", "slurm", "--slurm-partition", "gpu", "--gpus-per-run", "2", "--slurm-time", "30",
            "--slurm-set", "mem=16G", "--slurm-set", "qos=high", "--slurm-set", 'setup=["source env.sh"]']
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "submitted 3 jobs (4242, 4243, 4244) and merge job 4245 (afterany)" in summary
    assert f"leaderboard --results {out}/jobs/* --output {out}" in summary
    scripts = [(fake_slurm / f"script.{i}.sh").read_text() for i in range(4)]
    assert not (fake_slurm / "script.4.sh").exists()
    for script, run_id in zip(scripts, (FULL, LORA, JOINT)):
        for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1", "--time=30",
                     "--mem=16G", "--qos=high", f"--job-name={run_id}", f"--output={out}/jobs/{run_id}/submitit/"):
            assert f"#SBATCH {line}" in script, (line, script)
        assert "source env.sh" in script and "dependency" not in script
    merge = scripts[3]
    assert "#SBATCH --dependency=afterany:4242:4243:4244" in merge and "#SBATCH --ntasks-per-node=1" in merge
    assert "--gpus-per-node" not in merge and "#SBATCH --partition=gpu" in merge
    # what each job will run: the run's own config, into its own folder, data-parallel over its two tasks
    for job_id, run_id in zip((4242, 4243, 4244), (FULL, LORA, JOINT)):
        sub = DelayedSubmission.load(out / "jobs" / run_id / "submitit" / f"{job_id}_submitted.pkl")
        cfg, rid, force, _, distributed = sub.args
        assert sub.function.__module__ == "benchmark.jobs" and rid == run_id and distributed and not force
        assert cfg.output == str(out / "jobs" / run_id) and cfg.shard is None
    assert not list(out.glob("jobs/*/runs")), "nothing ran"

    # the merge job, run here: sacct says every job timed out without a record, so each gets a failed one
    assert DelayedSubmission.load(out / "submitit" / "4245_submitted.pkl").result() == 1
    rec = _record(out / "jobs" / LORA, LORA)
    assert rec["status"] == "failed" and rec["error"].startswith("job 4243 ended without a run record (state TIMEOUT")
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board["method"]) == ["full_ft", "joint_reference", "lora"] and list(board["n_failed"]) == [1, 1, 1]


def test_sbatch_refusing_a_job_is_one_line_exit_2(tmp_path, fake_slurm, capsys):
    argv = ["run", "--methods", "lora", "--output", str(tmp_path / "out"), *SETS, "--launcher", "slurm",
            "--slurm-partition", "nope"]
    assert main(argv) == 2
    _one_line_error(capsys, f"sbatch refused the job of {LORA}: sbatch: error: invalid partition specified: nope")


def test_slurm_without_sbatch_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("sbatch") is None
    assert main(["run", "--output", str(tmp_path / "out"), "--launcher", "slurm"]) == 2
    _one_line_error(capsys, "SLURM's sbatch was not found on PATH")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--slurm-partition", "gpu"], "--slurm-partition needs --launcher slurm"),
    (["--slurm-time", "30", "--launcher", "local"], "--slurm-time needs --launcher slurm, not local"),
    (["--slurm-set", "mem=1G"], "--slurm-set needs --launcher slurm"),
    (["--gpus-per-run", "1"], "--gpus-per-run needs --launcher slurm or local"),
    (["--launcher", "cluster"], "invalid choice: 'cluster'"),
    (["--launcher", "slurm", "--slurm-set", "nope=1"], "invalid --slurm-set nope=1: Unknown argument 'nope'"),
    (["--launcher", "slurm", "--slurm-set", "mem"], "invalid --slurm-set 'mem': expected KEY=VALUE"),
    (["--launcher", "slurm", "--slurm-set", "setup=[oops"], "invalid --slurm-set 'setup=[oops': not JSON"),
    (["--launcher", "slurm", "--gpus-per-run", "-1"], "invalid --gpus-per-run -1"),
    (["--launcher", "slurm", "--slurm-time", "0"], "invalid --slurm-time 0"),
])
def test_bad_launcher_flags_are_one_line_exit_2(flags, needle, tmp_path, fake_slurm, capsys):
    assert main(["run", "--output", str(tmp_path / "out"), *flags]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists() and not (fake_slurm / "count").exists()


@pytest.mark.slow
def test_local_job_of_two_processes_is_data_parallel(tmp_path, cache_dir, capsys):
    """``--gpus-per-run 2`` on a CPU-only machine: two gloo processes, set up by submitit's distributed env."""
    out = tmp_path / "out"
    argv = ["run", "--methods", "lora", "--output", str(out), *SETS, "--launcher", "local", "--gpus-per-run", "2"]
    assert main(argv) == 0
    rec = _record(out / "jobs" / LORA, LORA)
    assert rec["status"] == "success", rec["error"]
    assert all(len(s["rank_model_keys"]) == 2 and len(set(s["rank_model_keys"])) == 1 for s in rec["stages"])
    assert len(list((out / "jobs" / LORA / "submitit").glob("*_log.out"))) == 2, "one log per task"
