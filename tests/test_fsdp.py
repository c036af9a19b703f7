"""FSDP2 on the CPU: two processes over gloo (torch 2.13 runs ``fully_shard`` there).

- The mechanism: after :func:`benchmark.sharding.shard_model` each process holds half of every block weight;
  the sharded forward (through the model a method hands evaluation) equals the unsharded one; one AdamW step of
  the sharded trainer equals the unsharded step on the whole batch; the gathered state equals the weights.
- End to end: ``train.sharding=fsdp`` under torchrun gives records with the structure of a one-process run,
  losses within 1e-5 of DDP on the same processes (1e-2 of one process, as DDP) and scores within one
  document per task; a sharded run killed mid-stage and resumed is bit-identical to an
  uninterrupted sharded run.
- Bad input: methods that cannot run sharded, a run without a launcher, FSDP1 and unsupported accelerate FSDP
  options are refused with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from benchmark.cli import OFFLINE_VARS, main
from tests.conftest import TINY_RUN, make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [s for s in TINY_RUN if not s.startswith(("train.max_steps", "eval.limit"))] + [
    "train.max_steps=30", "eval.limit=4", "num_threads=1", "train.grad_accum=2"]  # 2 micro-batches: gradient sync
LIMIT = 4
LORA = "lora--tiny-world--tiny-world--seed0"


# -- the mechanism, in two spawned processes ---------------------------------------------------------------
def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _reference(method_name: str) -> dict[str, torch.Tensor]:
    """Unsharded, one process: logits before training and the weights after one AdamW step on the whole batch."""
    from methods import METHODS

    method = METHODS.get(method_name)()
    model = method.wrap(make_tiny_llama())
    batch = _batch()
    with torch.no_grad():
        logits = method.eval_model(model)(input_ids=batch["input_ids"]).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    return {"logits": logits, **method.trainable_state(model)}


def _shard_worker(rank: int, world: int, store: str, out: str, method_name: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from benchmark.sharding import gather_into, shard_model
    from methods import METHODS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        method = METHODS.get(method_name)()
        model = method.wrap(make_tiny_llama())
        twin = __import__("copy").deepcopy(model) if rank == 0 else None
        model = shard_model(model, torch.device("cpu"))
        local = {n: (p.to_local().shape, tuple(p.shape)) for n, p in model.named_parameters()
                 if isinstance(p, DTensor)}
        batch = _batch()
        with torch.no_grad():
            logits = method.eval_model(model)(input_ids=batch["input_ids"]).logits
        # the training loop's split: each process its rows; FSDP averages the gradients
        part = {k: v[rank::world] for k, v in batch.items()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**part).loss.backward()
        opt.step()
        gather_into(model, twin)
        if rank == 0:
            torch.save({"local": local, "logits": logits, "n_params": len(list(model.parameters())),
                        "state": method.trainable_state(twin)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["full_ft", "lora"])
def test_sharded_weights_forward_step_and_gathered_state(method_name, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    # spawn, not fork: forking a parent that already runs OpenMP/tokenizer threads can deadlock the children
    mp.start_processes(_shard_worker, args=(2, str(tmp_path / "store"), out, method_name), nprocs=2, join=True,
                       start_method="spawn")
    got, want = torch.load(out, weights_only=False), _reference(method_name)
    sharded = got["local"]
    assert len(sharded) == got["n_params"], "every parameter is a DTensor (blocks and the root's embeddings/head)"
    for name, (local_shape, full_shape) in sharded.items():
        if full_shape[0] >= 2:  # dim-0 sharding: each of 2 processes holds half the rows
            assert local_shape[0] == (full_shape[0] + 1) // 2, name
    # the model evaluation gets (the inner transformers model for LoRA) runs sharded and gives the same logits
    torch.testing.assert_close(got["logits"], want.pop("logits"), rtol=1e-5, atol=1e-5)
    assert set(got["state"]) == set(want)
    for name, tensor in want.items():  # one sharded step on half the rows each == one step on the whole batch
        torch.testing.assert_close(got["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# -- end to end through the command line -----------------------------------------------------------------------
def _cmd(out: Path, methods: str, processes: int, sharding: str = "fsdp") -> list[str]:
    cmd = [sys.executable, "-m", "benchmark", "-q", "run", "--methods", methods, "--seeds", "0", "--output", str(out),
           "--set", f"train.sharding={sharding}"]
    if processes > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    "-m", "benchmark"]
    if sharding == "fsdp":  # recomputing activations inside the sharded blocks must not change a number
        cmd += ["--set", "train.gradient_checkpointing=true", "--keep-weights", "final"]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE_VARS, "FORGETBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _record(out: Path, run_id: str) -> dict:
    rec = json.loads((out / "runs" / f"{run_id}.json").read_text())
    assert rec["status"] == "success", rec.get("error")
    return rec


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_bit_identically(tmp_path):
    cache = tmp_path / "fbcache"
    one, ddp, two, killed = tmp_path / "one", tmp_path / "ddp", tmp_path / "two", tmp_path / "killed"
    # the first also builds the tiny base, which the others then find cached
    for out, processes, sharding in ((one, 1, "none"), (ddp, 2, "none"), (two, 2, "fsdp")):
        run = subprocess.run(_cmd(out, "full_ft,lora", processes, sharding), cwd=ROOT, env=_env(cache),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    assert not [p for p in two.rglob("*") if p.name.startswith(".")], "only rank 0 writes, atomically"
    kept = json.loads((two / "weights" / LORA / "stage-3" / "weights.json").read_text())
    assert kept["model_key"] == _record(two, LORA)["stages"][-1]["model_key"]  # kept from the gathered state

    for method in ("full_ft", "lora"):
        run_id = f"{method}--tiny-world--tiny-world--seed0"
        a, b, d = _record(one, run_id), _record(two, run_id), _record(ddp, run_id)
        assert b["config"]["train"]["sharding"] == "fsdp" and a["config"]["train"]["sharding"] == "none"
        # against DDP on the same 2 processes, sharding changes only the reduction's rounding
        assert [s["final_loss"] for s in b["stages"]] == pytest.approx([s["final_loss"] for s in d["stages"]],
                                                                      rel=1e-5)
        for key in ("tasks", "general_tasks", "metric_names", "sequence_id", "adapted_modules"):
            assert b[key] == a[key], key
        assert b["costs"]["trainable_params"] == a["costs"]["trainable_params"]
        assert [len(r) for r in b["R"]] == [len(r) for r in a["R"]] and len(b["G"]) == len(a["G"])
        # tolerance: the same base scores; after training, any score within one document of the 4 per task
        assert b["R"][0] == a["R"][0] and b["G"][0] == a["G"][0]
        for row_a, row_b in zip(a["R"] + a["G"], b["R"] + b["G"]):
            assert all(abs(x - y) <= 100 / LIMIT for x, y in zip(row_a, row_b)), (row_a, row_b)
        for sa, sb in zip(a["stages"], b["stages"]):
            assert set(sb) == set(sa) and sb["steps"] == sa["steps"]
            # half the rows per process: the summation order differs, and 90 steps compound it (DDP drifts alike)
            assert sb["final_loss"] == pytest.approx(sa["final_loss"], rel=1e-2)
            assert len(set(sb["rank_model_keys"])) == 1 and sb["rank_model_keys"][0] == sb["model_key"]

    # kill -9 the whole sharded job in lora's second stage, then run the same command again
    victim = subprocess.Popen(_cmd(killed, "lora", 2), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    t0, ckpt = time.monotonic(), killed / "checkpoints" / LORA / "stage-1"
    while not ckpt.exists():
        assert victim.poll() is None, f"the run ended (rc {victim.returncode}) before {ckpt} appeared"
        assert time.monotonic() - t0 < 500
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill them all, as a node failure would
    for proc in [*psutil.Process(victim.pid).children(recursive=True), psutil.Process(victim.pid)]:
        proc.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "runs" / f"{LORA}.json").exists()
    resumed = subprocess.run(_cmd(killed, "lora", 2), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _record(two, LORA), _record(killed, LORA)
    assert got["resumed_from"] and not want["resumed_from"]
    for key in ("R", "G"):
        assert got[key] == want[key], key
    assert [s["final_loss"] for s in got["stages"]] == [s["final_loss"] for s in want["stages"]]
    assert [s["model_key"] for s in got["stages"]] == [s["model_key"] for s in want["stages"]]


# -- refused before any work -----------------------------------------------------------------------------------
def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_methods_that_cannot_run_sharded_are_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _refused(capsys, ["run", "--methods", "lora,ewc,olora", "--set", "train.sharding=fsdp", "--output",
                            str(tmp_path / "o"), "--dry-run"])
    assert "ewc, olora" in err and "methods that can: full_ft, lora" in err
    assert not (tmp_path / "o").exists()


def test_sharding_needs_a_launcher_and_a_valid_value(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    err = _refused(capsys, ["run", "--methods", "lora", "--set", "train.sharding=fsdp", "--dry-run"])
    assert "torchrun or accelerate launch" in err
    err = _refused(capsys, ["run", "--methods", "lora", "--set", "train.sharding=zero3", "--dry-run"])
    assert "'zero3'" in err and "valid: none, fsdp" in err


@pytest.mark.parametrize("env, words", [
    ({"FSDP_VERSION": "1"}, "fsdp_version 1"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS"),
    ({"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "SIZE_BASED_WRAP"),
])
def test_accelerate_fsdp_configs_we_do_not_implement_are_refused(env, words, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert words in _refused(capsys, ["run", "--methods", "lora", "--dry-run"])


def test_a_sharded_sweep_needs_jobs_of_several_processes(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # the submitting process is never part of the group
    err = _refused(capsys, ["run", "--methods", "lora", "--set", "train.sharding=fsdp", "--launcher", "local",
                            "--output", str(tmp_path / "o"), "--dry-run"])
    assert "--gpus-per-run of 2 or more" in err and "got 1" in err


@pytest.mark.slow
def test_local_launcher_runs_a_sharded_job_of_two_processes(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["-q", "run", "--methods", "lora", "--output", str(tmp_path), "--launcher", "local", "--gpus-per-run", "2",
            "--set", "train.sharding=fsdp"]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    rec = _record(tmp_path / "jobs" / LORA, LORA)
    assert rec["config"]["train"]["sharding"] == "fsdp"
    assert all(len(s["rank_model_keys"]) == 2 for s in rec["stages"])  # both processes of the job took part
    assert (tmp_path / "leaderboard.csv").is_file()
