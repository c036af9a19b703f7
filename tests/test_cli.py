"""The command line: listing, dry runs, one-line errors with exit code 2, and an outside plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmark.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_ls_methods_shows_origin(capsys):
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert "full_ft" in out and "lora" in out and "builtin:methods.lora" in out


def test_ls_tasks_and_sequences(capsys):
    assert main(["ls", "tasks"]) == 0
    assert "tw_add" in capsys.readouterr().out
    assert main(["ls", "sequences"]) == 0
    assert "tiny-world" in capsys.readouterr().out


def test_dry_run_prints_plan(capsys, tmp_path):
    assert main(["run", "--methods", "full_ft,lora", "--seeds", "0,1", "--dry-run", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 methods x 2 seeds x 3 stages = 4 runs" in out
    assert "tw_add" in out and "tw_sentiment" in out and "tw_topic" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize("argv, needle", [
    (["run", "--methods", "nope"], "unknown method 'nope'"),
    (["run", "--methods", "loar"], "did you mean 'lora'"),
    (["run", "--sequence", "tiny-wrld"], "did you mean 'tiny-world'"),
    (["run", "--set", "train.lr=-1"], "train.lr"),
    (["run", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
    (["run", "--set", "methods.lora.r=0"], "Invalid r"),
    (["run", "--set", "methods.lora.rank=4"], "unknown config key 'methods.lora.rank'"),
    (["run", "--config", "/nonexistent.yaml"], "config file not found"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert main(argv + ["--output", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_method_subprocess_exit_code():
    p = subprocess.run([sys.executable, "-m", "benchmark", "run", "--methods", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "nope" in p.stderr and "full_ft" in p.stderr


PLUGIN = '''
from dataclasses import dataclass
from torch import nn
from methods.base import Method, MethodConfig


@dataclass
class NormConfig(MethodConfig):
    pass


class NormTuning(Method):
    """Trains only the RMSNorm scales (an outside method, discovered through its entry point)."""

    config_cls = NormConfig

    def wrap(self, model: nn.Module) -> nn.Module:
        for n, p in model.named_parameters():
            p.requires_grad_("norm" in n)
        return model
'''


@pytest.fixture
def plugin_path(tmp_path):
    """An installed-looking outside package: a module plus a dist-info folder declaring the entry point."""
    (tmp_path / "fb_outside_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "fb_outside_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fb-outside-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("[forgetbench.methods]\nnorm_tuning = fb_outside_plugin:NormTuning\n"))
    return tmp_path


@pytest.mark.slow
def test_outside_plugin_is_discovered_and_runs(plugin_path, tmp_path, cache_dir):
    env = dict(os.environ, PYTHONPATH=f"{plugin_path}{os.pathsep}{ROOT}", FORGETBENCH_CACHE=str(cache_dir))
    ls = subprocess.run([sys.executable, "-m", "benchmark", "ls", "methods"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "norm_tuning" in ls.stdout and "plugin:fb-outside-plugin" in ls.stdout
    from tests.conftest import TINY_RUN

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmark", "-q", "run", "--methods", "norm_tuning", "--output", str(out)]
    for s in TINY_RUN:
        cmd += ["--set", s]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    rec = json.loads((out / "runs" / "norm_tuning--tiny-world--tiny-world--seed0.json").read_text())
    assert rec["status"] == "success" and len(rec["R"]) == 4
