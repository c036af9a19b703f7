"""The command line as people type it: -q/-v anywhere, --version, method options, fractional limits, auto batch
size, silent -q runs and a dry run that says what each run would do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from benchmark.cli import build_parser, main
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "ls", "methods"], True, False),
    (["ls", "-q", "methods"], True, False),
    (["ls", "methods", "-q"], True, False),
    (["run", "-v"], False, True),
    (["-v", "run"], False, True),
    (["leaderboard", "--results", "x", "--quiet"], True, False),
    (["prepare", "-v"], False, True),
    (["ls", "tasks"], False, False),
])
def test_quiet_and_verbose_anywhere(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"forgetbench {metadata.version('forgetbench')}"


def test_ls_method_options(capsys):
    assert main(["ls", "methods", "--options", "lora"]) == 0
    out = capsys.readouterr().out
    r_line = next(line for line in out.splitlines() if line.split()[:1] == ["r"])
    assert r_line.split()[:3] == ["r", "int", "8"] and "LoRA rank." in r_line
    assert "methods.lora.OPTION=VALUE" in out and "target_modules" in out


@pytest.mark.parametrize("argv, needle", [
    (["ls", "methods", "--options", "lroa"], "did you mean 'lora'"),
    (["ls", "tasks", "--options", "lora"], "--options goes with `ls methods`"),
])
def test_ls_options_bad_input(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and err.count("\n") == 1
    if "lroa" in argv:
        assert "full_ft" in err  # the valid names


def test_ls_tasks_shows_descriptions(capsys):
    assert main(["ls", "tasks"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tw_add "))
    assert "[downstream, skill, exact_match]" in line and "two-digit addition" in line


@pytest.mark.parametrize("argv", [
    ["--limit", "0"], ["--limit", "-3"], ["--limit", "1.5"], ["--limit", "1.0"], ["--limit", "abc"],
    ["--limit", "nan"], ["--set", "eval.limit=0.0"], ["--set", "eval.limit=2.5"], ["--set", "eval.limit=-1"],
    ["--set", "eval.batch_size=0"], ["--set", "eval.batch_size=big"], ["--set", "eval.batch_size=2.5"],
    ["--set", "eval.batch_size=true"],
])
def test_bad_limit_and_batch_size(argv, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["run", *argv, "--dry-run", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    assert ("limit" in err) or ("batch_size" in err)
    assert not out.exists()


def test_fraction_and_count_limits_never_share_a_cache_entry(tmp_path):
    from benchmark.cli import run_config
    from benchmark.evalcache import eval_key
    from benchmark.plan import make_plan
    from benchmark.scoring import eval_settings

    parser = build_parser()
    keys = {}
    for limit in ("0.5", "1", "6"):
        cfg = run_config(parser.parse_args(["run", "--limit", limit, "--output", str(tmp_path)]))
        plan = make_plan(cfg)
        settings = eval_settings(plan, lambda: None)
        assert settings["limit"] == cfg.eval.limit == (float(limit) if "." in limit else int(limit))
        keys[limit] = eval_key("m" * 64, plan.tasks, [], settings)[0]
    assert len(set(keys.values())) == 3
    auto = run_config(parser.parse_args(["run", "--set", "eval.batch_size=auto", "--output", str(tmp_path)]))
    assert auto.eval.batch_size == "auto" and auto.to_dict()["eval"]["batch_size"] == "auto"


@pytest.mark.slow
def test_quiet_run_draws_no_progress_bar(tmp_path, cache_dir):
    """A tiny ``run -q`` writes no carriage return to stderr: no tqdm bar of ours, lm-eval's or the libraries'."""
    env = dict(os.environ, FORGETBENCH_CACHE=str(cache_dir), PYTHONPATH=str(ROOT))
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-m", "benchmark", "-q", "run", "--methods", "lora", "--output", str(tmp_path / "out"),
           *_sets(TINY_RUN)]
    # bytes: text mode would turn every carriage return into a newline
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=900)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err[-2000:]
    assert b"\r" not in p.stderr and "it/s]" not in err, repr(err[:1000])


@pytest.mark.slow
def test_auto_batch_fraction_limit_and_dry_run_status(tmp_path, cache_dir, capsys, monkeypatch):
    """eval.batch_size=auto and a fractional limit reach lm-eval and the record; the dry run then says done / new /
    resume for each run."""
    from benchmark import checkpoint
    from benchmark.cli import run_config
    from benchmark.paths import checkpoint_dir
    from benchmark.plan import run_inputs
    from benchmark.progress import QUIET_VARS
    from benchmark.reference import all_runs
    from benchmark.validate import validate

    for k in QUIET_VARS:  # `-q` sets these in this process; undone after the test
        monkeypatch.delenv(k, raising=False)

    out = tmp_path / "out"
    settings = _sets(TINY_RUN + ["eval.batch_size=auto", "eval.limit=0.5"])
    assert main(["run", "-q", "--methods", "lora", "--output", str(out), *settings]) == 0
    rec = json.loads((out / "runs" / "lora--tiny-world--tiny-world--seed0.json").read_text())
    assert rec["status"] == "success"
    assert rec["config"]["eval"]["batch_size"] == "auto" and rec["config"]["eval"]["limit"] == 0.5
    assert 0 < min(rec["n_examples"].values())
    runs_csv = (out / "runs.csv").read_text()
    assert ",auto,0.5," in runs_csv
    assert "evaluation batch size auto" in (out / "leaderboard.md").read_text()

    argv = ["run", "--methods", "lora,full_ft", "--output", str(out), *settings]
    plan = validate(run_config(build_parser().parse_args(argv)))
    full = next(r for r in all_runs(plan) if r.method == "full_ft")
    checkpoint.save_stage(checkpoint_dir(out, full.run_id), 1, {}, None, {"inputs": run_inputs(plan, full)})
    capsys.readouterr()
    assert main(argv + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "run lora seed 0: done" in text and "run full_ft seed 0: resume from stage 2/3" in text
    assert main(argv + ["--dry-run", "--force"]) == 0
    assert "run lora seed 0: new (--force)" in capsys.readouterr().out
    checkpoint.remove(checkpoint_dir(out, full.run_id))
    assert main(argv + ["--dry-run"]) == 0
    assert "run full_ft seed 0: new" in capsys.readouterr().out


def test_tables_keep_auto_and_fractions_as_configured():
    from benchmark.tables import setting_value, smallest_setting, typed_frame

    assert [setting_value(v) for v in (16, 16.0, 0.5, "auto", None, float("nan"))] == [16, 16, 0.5, "auto", None,
                                                                                       None]
    assert smallest_setting([32, "auto", 16]) == 16 and smallest_setting(["auto", None]) == "auto"
    assert smallest_setting([None]) is None
    df = typed_frame([{"a": 1, "b": 16.0}, {"a": 2, "b": "auto"}, {"a": 3, "b": None}], ["a", "b"], ints=["a"],
                     settings=["b"])
    assert df.to_csv(index=False) == "a,b\n1,16\n2,auto\n3,\n"


def test_quiet_children_sets_the_switches_only_while_open(monkeypatch):
    from benchmark.progress import QUIET_VARS, bars_disabled, quiet_children

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    with quiet_children():
        assert all(os.environ[k] == v for k, v in QUIET_VARS.items()) and bars_disabled()
    assert "TQDM_DISABLE" not in os.environ and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert not bars_disabled()
