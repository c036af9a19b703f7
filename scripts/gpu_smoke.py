"""A few training steps of every registered method, under each precision policy, on a real-architecture model.

The model is a Qwen2 decoder with the shape of Qwen2.5-0.5B (24 layers, hidden 896, 14 query / 2 key-value
heads, MLP 4864, vocabulary 151,936; from its public ``config.json``), built locally with random weights, so
nothing is downloaded. Every method is trained under ``train.precision=bf16-mixed`` and ``fp32`` (the policies
of ``benchmark/precision.py``, applied by the trainer as in a run). Prints, per method and policy: tokens/s,
peak GPU memory, the dtypes of the trainable parameters and whether the loss stayed finite. Exits 1 when any
method failed, or kept a trainable parameter that is not fp32 under ``bf16-mixed``.

    python scripts/gpu_smoke.py                         # on a GPU machine
    python scripts/gpu_smoke.py --tiny --steps 1        # the same code path on a CPU, with a 2-layer model
    python scripts/gpu_smoke.py --fsdp 8                # FSDP2 vs DDP: a short tiny-world run on 8 processes

``--fsdp N`` runs ``python -m benchmark run`` (full_ft and lora, a small tiny-world recipe) under ``torchrun``
with N processes twice, data-parallel and with ``train.sharding=fsdp``, and prints per run: status, peak
memory per process and the final losses side by side (they agree up to the reductions' rounding). Exits 1 when
a run failed or the losses differ by more than 1e-3 relative. On a CPU it runs over gloo.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
POLICIES = ("bf16-mixed", "fp32")


def smoke(method_name: str, shape: dict, steps: int, batch: int, seq_len: int, precision: str) -> dict:
    """Train ``steps`` optimiser steps of one method on random tokens under ``precision``; returns measurements."""
    from accelerate import Accelerator
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmark.config import TrainConfig
    from benchmark.data import Example
    from benchmark.precision import load_dtype
    from benchmark.train import train_stage
    from methods import METHODS
    from methods.base import TaskInfo

    torch.manual_seed(0)
    dtype = load_dtype(precision)  # the base is stored as a run with this policy stores it
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(dtype)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    cls = METHODS.get(method_name)
    method = cls(cls.config_cls())
    model = method.wrap(model)
    rng = random.Random(0)
    examples = []
    for _ in range(batch * 2):
        ids = [rng.randrange(shape["vocab_size"]) for _ in range(seq_len)]
        examples.append(Example(ids, [-100] * (seq_len // 2) + ids[seq_len // 2:]))
    info = TaskInfo(name="random", kind="skill", stage=1, num_stages=1)
    method.on_task_start(model, info)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(lr=1e-4, batch_size=batch, max_seq_len=seq_len, precision=precision)
    t0 = time.perf_counter()
    stats = train_stage(model, method, examples, steps, cfg, 1e-4, torch.Generator().manual_seed(0), 0, accelerator,
                        quiet=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    method.on_task_end(model, info)
    trainable = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    return {"method": method_name, "precision": precision, "base": str(dtype).replace("torch.", ""),
            "trainable": method.param_counts(model)["trainable"], "trainable_dtypes": trainable,
            "tokens_per_s": stats.tokens / seconds,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
            "final_loss": stats.final_loss, "finite": bool(torch.isfinite(torch.tensor(stats.final_loss)))}


FSDP_RECIPE = ["model.pretrain.hidden_size=64", "model.pretrain.num_layers=2", "model.pretrain.num_heads=4",
               "model.pretrain.intermediate_size=128", "model.pretrain.vocab_size=400", "model.pretrain.max_steps=50",
               "train.max_steps=20", "train.batch_size=16", "eval.limit=20", "eval.batch_size=16"]


def fsdp_check(processes: int) -> int:
    """DDP and FSDP2 runs of the same plan on ``processes`` processes; 1 when a run failed or their losses differ."""
    bad, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for sharding in ("none", "fsdp"):
            out = Path(tmp) / sharding
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "benchmark", "-q", "run", "--methods", "full_ft,lora", "--output", str(out),
                   "--set", f"train.sharding={sharding}"] + [a for s in FSDP_RECIPE for a in ("--set", s)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                bad.append(f"{sharding}: exit {proc.returncode}: {proc.stderr[-2000:]}")
                continue
            for f in sorted((out / "runs").glob("*.json")):
                rec = json.loads(f.read_text())
                results[(sharding, rec["method"])] = rec
                print(f"{sharding:<5} {rec['method']:<8} {rec['status']:<8} peak {rec['costs']['peak_memory_mb']:8.0f} "
                      f"MB/process  losses {[round(s['final_loss'], 5) for s in rec['stages']]}  "
                      f"({time.perf_counter() - t0:.0f} s for the pair)")
                if rec["status"] != "success":
                    bad.append(f"{sharding} {rec['method']}: {rec.get('error')}")
    for method in ("full_ft", "lora"):
        a, b = results.get(("none", method)), results.get(("fsdp", method))
        if a and b:
            for sa, sb in zip(a["stages"], b["stages"]):
                if abs(sa["final_loss"] - sb["final_loss"]) > 1e-3 * abs(sa["final_loss"]):
                    bad.append(f"{method} stage {sa['stage']}: DDP loss {sa['final_loss']} vs FSDP {sb['final_loss']}")
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    from methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", help="comma-separated (default: every registered method)")
    p.add_argument("--precisions", default=",".join(POLICIES), help=f"comma-separated (default: {','.join(POLICIES)})")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same architecture (CPU check)")
    p.add_argument("--fsdp", type=int, metavar="N", help="instead: DDP vs FSDP2 runs on N processes (see above)")
    args = p.parse_args()
    if args.fsdp:
        return fsdp_check(args.fsdp)
    names = args.methods.split(",") if args.methods else METHODS.names()
    shape = TINY if args.tiny else QWEN25_05B
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"Qwen2 {'tiny' if args.tiny else '0.5B-shaped'} random weights on {device}; {args.steps} steps, "
          f"batch {args.batch} x {args.seq_len} tokens")
    print(f"{'method':<10} {'precision':<11} {'base':<9} {'trainable':>12} {'tokens/s':>10} {'peak GB':>8} "
          f"{'loss':>8} finite  trainable dtypes")
    bad = []
    for precision in args.precisions.split(","):
        for name in names:
            try:
                r = smoke(name, shape, args.steps, args.batch, args.seq_len, precision)
            except Exception as exc:  # report and go on: one broken method must not hide the others
                print(f"{name:<10} {precision:<11} FAILED {type(exc).__name__}: {exc}")
                bad.append(f"{name} {precision}: {type(exc).__name__}")
                continue
            print(f"{r['method']:<10} {precision:<11} {r['base']:<9} {r['trainable']:>12,} {r['tokens_per_s']:>10,.0f} "
                  f"{r['peak_gb']:>8.2f} {r['final_loss']:>8.3f} {str(r['finite']):<7} {','.join(r['trainable_dtypes'])}")
            if precision == "bf16-mixed" and r["trainable_dtypes"] != ["float32"]:
                bad.append(f"{name} bf16-mixed: trainable parameters in {r['trainable_dtypes']}, not float32")
            if not r["finite"]:
                bad.append(f"{name} {precision}: non-finite loss")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
