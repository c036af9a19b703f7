"""Resume after ``kill -9``: the same final numbers as an uninterrupted run; checkpoints and the evaluation cache.

The end-to-end test runs the real command in subprocesses: an uninterrupted run into one directory and, at the
same time, a run into another that is killed (SIGKILL) during a stage, left with half-written files, and resumed
by re-running the same command. R, G, every stage's final loss and the content hash of the model after every
stage must be identical, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark import checkpoint
from benchmark.evalcache import EvalCache, eval_key, model_hash
from benchmark.records import first_difference
from tests.conftest import TINY_RUN, make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# enough steps that a stage takes a moment; one thread so both processes compute the same numbers
SETTINGS = [s for s in TINY_RUN if not s.startswith("train.max_steps")] + ["train.max_steps=40", "num_threads=1"]
LORA = "lora--tiny-world--tiny-world--seed0"
FULL = "full_ft--tiny-world--tiny-world--seed0"


def _cmd(out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmark", "run", "--methods", "full_ft,lora", "--output", str(out)]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd


def _env(cache_dir: Path) -> dict[str, str]:
    return dict(os.environ, FORGETBENCH_CACHE=str(cache_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _start(out: Path, cache_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 500.0) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (i.e. during the stage after the one checkpointed there)."""
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _numbers(out: Path, run_id: str) -> dict:
    rec = json.loads((out / "runs" / f"{run_id}.json").read_text())
    assert rec["status"] == "success", rec.get("error")
    return {"R": rec["R"], "G": rec["G"], "loss": [s["final_loss"] for s in rec["stages"]],
            "model": [s["model_key"] for s in rec["stages"]], "resumed_from": rec["resumed_from"]}


@pytest.fixture
def base_model(cache_dir):
    """Build the tiny base model once here, so the concurrent subprocesses below don't both pretrain it."""
    from benchmark.config import make_config
    from benchmark.plan import make_plan
    from benchmark.runner import base_model_path

    base_model_path(make_plan(make_config({}, SETTINGS)), quiet=True)
    return cache_dir


@pytest.mark.slow
def test_kill_9_mid_stage_then_resume_gives_identical_records(tmp_path, base_model):
    cache_dir = base_model
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = _start(ref_out, cache_dir, tmp_path / "ref.log")
    victim = _start(out, cache_dir, tmp_path / "victim.log")
    _kill_when(victim, out / "checkpoints" / LORA / "stage-1")  # full_ft done; lora killed in its 2nd stage
    assert json.loads((out / "runs" / f"{FULL}.json").read_text())["status"] == "success"
    assert not (out / "checkpoints" / FULL).exists(), "a finished run's checkpoints are deleted"
    assert not (out / "runs" / f"{LORA}.json").exists()
    # normally stage-1 alone; on a busy machine the kill may land later: after stage-2's rename (both still
    # there, the old one not yet removed) or while stage-2 is being written (a .tmp- folder)
    stages = sorted(p.name for p in (out / "checkpoints" / LORA).iterdir() if p.name.startswith("stage-"))
    assert stages in (["stage-1"], ["stage-1", "stage-2"], ["stage-2"]), stages
    done = int(stages[-1][-1])
    # what a kill in the middle of a write leaves: a half-written checkpoint folder and a record temp file
    junk = out / "checkpoints" / LORA / ".tmp-stage-2-dead"
    junk.mkdir(exist_ok=True)
    (junk / "trainable.safetensors").write_bytes(b"\x00" * 10)
    (out / "runs" / f".{LORA}.json.dead").write_text('{"run_id": "half')

    # the same command again: skips the finished full_ft run, resumes lora after its first stage
    resumed = subprocess.run(_cmd(out), cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert "skipped: already finished" in resumed.stderr and f"resuming after stage {done}/3" in resumed.stderr
    assert "base evaluation: cache hit" in resumed.stderr
    assert not (out / "checkpoints" / LORA).exists(), "half-written folder cleaned, finished run's checkpoint gone"

    for run_id, resumed_from in ((FULL, []), (LORA, [done])):
        want, got = _numbers(ref_out, run_id), _numbers(out, run_id)
        assert want.pop("resumed_from") == [] and got.pop("resumed_from") == resumed_from
        assert got == want, run_id  # R, G, per-stage final loss and weights hash: bit-identical
    cols = ["run_id", "stage", "task", "value"]
    a = pd.read_csv(ref_out / "scores.csv")[cols].sort_values(cols[:3]).reset_index(drop=True)
    b = pd.read_csv(out / "scores.csv")[cols].sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert set(pd.read_csv(out / "leaderboard.csv")["method"]) == {"full_ft", "lora"}


@pytest.mark.parametrize("name", sorted(__import__("methods").METHODS.names()))
def test_every_method_state_round_trips_through_a_stage_checkpoint(name, tmp_path, tiny_llama):
    """What resume does: fresh base -> wrap -> load the saved state; the trainable state must come back equal."""
    import copy

    from benchmark.data import Example, collate
    from methods import METHODS, StageData
    from methods.base import TaskInfo

    cls = METHODS.get(name)
    fresh = copy.deepcopy(tiny_llama)
    info = TaskInfo(name="t", kind="skill", stage=1, num_stages=2)
    method = cls(cls.config_cls())
    model = method.wrap(tiny_llama)
    method.on_task_start(model, info)
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, [-100] * 2 + ids[2:]) for ids in (torch.randint(0, 100, (6,), generator=g).tolist()
                                                              for _ in range(4))]
    # the stage's data, as the stage loop hands it over (a method may keep it: replay's buffer, EWC's Fisher)
    method.on_stage_data(model, info, StageData(examples, lambda: list(examples), partial(collate, pad_id=0)))
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    method.on_task_end(model, info)
    saved = method.trainable_state(model)
    checkpoint.save_stage(tmp_path, 1, saved, None, {})

    method2 = cls(cls.config_cls())
    model2 = method2.wrap(fresh)
    method2.load_trainable_state(model2, checkpoint.load_latest(tmp_path).trainable)
    again = method2.trainable_state(model2)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    x = torch.randint(0, 100, (2, 8))
    model.eval(), model2.eval()
    with torch.no_grad():
        assert torch.equal(method.eval_model(model)(x).logits, method2.eval_model(model2)(x).logits)


# -- checkpoints --------------------------------------------------------------------------------------------
def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(3)
    tensors, meta = checkpoint.capture_rng(gen)
    first = (torch.rand(3), np.random.rand(2), random.random(), torch.randperm(9, generator=gen))
    checkpoint.restore_rng(tensors, json.loads(json.dumps(meta)), gen)  # the JSON round trip it gets on disk
    again = (torch.rand(3), np.random.rand(2), random.random(), torch.randperm(9, generator=gen))
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]
    assert torch.equal(first[3], again[3])
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with checkpoint.preserved_rng():  # what wraps every evaluation
        torch.rand(5), random.random(), np.random.rand()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_stage_checkpoints_keep_latest_and_skip_damaged(tmp_path, caplog):
    run_dir = tmp_path / "ck"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    checkpoint.save_stage(run_dir, 1, state, None, {"record": {"R": [[1.0]]}})
    checkpoint.save_stage(run_dir, 2, {"w": state["w"] + 1}, None, {"record": {"R": [[1.0], [2.0]]}})
    assert sorted(p.name for p in run_dir.iterdir()) == ["stage-2"]
    ck = checkpoint.load_latest(run_dir)
    assert ck.stage == 2 and torch.equal(ck.trainable["w"], state["w"] + 1) and ck.meta["record"]["R"][1] == [2.0]
    assert ck.meta["torch_threads"] == torch.get_num_threads()
    # external damage (a truncated tensor file) is reported and never loaded
    with open(run_dir / "stage-2" / "trainable.safetensors", "r+b") as f:
        f.truncate(20)
    assert checkpoint.load_latest(run_dir) is None
    assert "damaged checkpoint" in caplog.text
    # only safetensors and JSON on disk: nothing that unpickles
    assert {p.suffix for p in (run_dir / "stage-2").iterdir()} == {".safetensors", ".json"}


def test_first_difference_names_the_changed_setting():
    old = {"train": {"lr": 0.001, "batch_size": 8}, "seed": 0}
    assert first_difference(old, json.loads(json.dumps(old))) is None
    assert first_difference(old, {"train": {"lr": 0.5, "batch_size": 8}, "seed": 0}) == \
        "train.lr: 0.001 -> 0.5"
    assert "num_threads=2" in checkpoint.thread_mismatch(1, 2) and checkpoint.thread_mismatch(1, None) is None


# -- the content-keyed evaluation cache ----------------------------------------------------------------------
@pytest.fixture
def task_copy(tmp_path):
    """A downstream task whose data file lives in tmp_path (so the test may change it)."""
    from tasks.base import TaskSpec

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "target": "2"}\n{"prompt": "2+2=", "target": "4"}\n')
    return TaskSpec(name="t_copy", data={"train": str(data), "test": str(data)}), data


def test_eval_cache_hits_only_on_identical_content(tmp_path, task_copy, tiny_llama):
    spec, data = task_copy
    cache = EvalCache(tmp_path / "cache")
    calls = []

    def lookup(model_key):
        key, parts = eval_key(model_key, [spec], [], {"batch_size": 4, "limit": None, "device": "cpu"})
        return cache.get_or_compute(key, parts, lambda: calls.append(1) or {"scores": {"t_copy": 50.0}})

    weights = model_hash(tiny_llama)
    assert lookup(weights) == ({"scores": {"t_copy": 50.0}}, False)
    assert lookup(weights)[1] is True and len(calls) == 1, "same model, data, settings, versions: reused"

    data.write_text(data.read_text().replace('"4"', '"5"'))  # one byte of the test data changes
    assert lookup(weights)[1] is False and len(calls) == 2, "changed data: recomputed"

    with torch.no_grad():
        next(tiny_llama.parameters())[0, 0] += 1e-3  # one weight changes
    assert model_hash(tiny_llama) != weights
    assert lookup(model_hash(tiny_llama))[1] is False and len(calls) == 3, "changed weights: recomputed"

    # an entry that does not match its key (tampered, or a truncated-hash collision) or is unreadable: a miss
    # The entry is named by the current key: three entries exist and glob order is the filesystem's, not ours.
    key, parts = eval_key(model_hash(tiny_llama), [spec], [], {"batch_size": 4, "limit": None, "device": "cpu"})
    entry = tmp_path / "cache" / f"eval-{key}.json"
    stored = json.loads(entry.read_text())
    stored["parts"]["settings"]["batch_size"] = 99
    entry.write_text(json.dumps(stored))
    assert cache.get(key, parts) is None
    entry.write_text("{not json")
    assert cache.get(key, parts) is None


def test_resume_under_bf16_mixed_keeps_the_fp32_trainable_weights_exactly(tiny_llama):
    """A full fine-tune under bf16-mixed trains fp32 weights on a bf16 base; its checkpoint holds fp32 values that
    bf16 cannot represent, and restoring them must not round them through the bf16 parameters."""
    from benchmark.stages import restore_checkpoint
    from methods import METHODS

    method = METHODS.get("full_ft")()
    state = {n: (torch.full_like(p, 1.0, dtype=torch.float32) + 2.0 ** -12)  # 1 + 2^-12: not a bf16 number
             for n, p in method.wrap(make_tiny_llama()).named_parameters()}
    tensors, meta = checkpoint.capture_rng()
    ck = checkpoint.StageCheckpoint(stage=1, trainable=state, rng_tensors=tensors,
                                    meta={"inputs": {}, "base_model_hash": "h", "rng": meta})
    model = method.wrap(tiny_llama.to(torch.bfloat16))  # the base as load_base stores it under bf16-mixed
    restore_checkpoint(ck, method, model, torch.Generator(), {}, "h", "test", "bf16-mixed")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p.detach(), state[name]), name
