"""Memory and disk per method: stage-checkpoint bytes against the trainable parameters' bytes, and peak memory.

Each method runs the tiny-world sequence in its own process (peak resident memory is per process), shortened
(``train.max_steps``, ``eval.limit``: the sizes measured do not depend on the step count), under
``scripts/harness_probe.py``, which records the files of every stage checkpoint the runner writes
(``DIR/checkpoints/<run_id>/stage-<t>/``: ``trainable.safetensors``, ``rng.safetensors``, ``state.json``).

Goal (issue 9): checkpoint bytes per stage <= 1.1x the trainable parameters' bytes for PEFT methods. Reported:
``trainable.safetensors`` alone (the method's trainable state: its parameters plus any state it carries between
stages that is not a parameter, e.g. SLIM's sliding cluster statistics, shown as "non-param state") and the
whole stage folder (adds RNG streams and the partial run record: a fixed few tens of kB). Peak memory:
``costs.peak_memory_mb`` of each run record (process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a
GPU).

Usage: python scripts/bench_memory.py [--methods lora,loramoe,slim,hilo,full_ft] [--steps 10] [--limit 16].
Writes results/bench/memory.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchlib import fmt_table, offline_env, probe_run, registered_methods, verdict, write_result
from benchmark.records import read_record  # noqa: E402 - benchlib puts the repository on sys.path

GOAL = 1.1
PEFT = ("lora", "loramoe", "slim", "hilo")


def measure(method: str, steps: int, limit: int, sets: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fb-bench-memory-") as tmp:
        cli = ["-q", "run", "--methods", method, "--seeds", "0", "--output", str(Path(tmp) / "out"),
               "--set", f"train.max_steps={steps}", "--set", f"eval.limit={limit}"]
        for s in sets:
            cli += ["--set", s]
        d = probe_run(cli)
        rec = read_record(next((Path(tmp) / "out" / "runs").glob("*.json")))
    ck = d.get("checkpoints", [])
    param_bytes = ck[0]["trainable_param_bytes"] if ck else None
    return {"status": rec.status, "error": rec.error, "peak_memory_mb": rec.costs.peak_memory_mb,
            "trainable_params": rec.costs.trainable_params, "trainable_param_bytes": param_bytes,
            "checkpoints": ck,
            "extra_state_bytes": max(c["state_tensor_bytes"] for c in ck) - param_bytes if ck else None,
            "adapter_file_ratio": max(c["files"]["trainable.safetensors"] / param_bytes for c in ck) if ck else None,
            "stage_folder_ratio": max(c["total_bytes"] / param_bytes for c in ck) if ck else None,
            "wall_s": d["wall_s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,loramoe,slim,hilo,full_ft")
    ap.add_argument("--steps", type=int, default=10, help="train.max_steps of every stage")
    ap.add_argument("--limit", type=int, default=16, help="eval.limit (examples per task)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    a = ap.parse_args(argv)
    offline_env()
    methods, skipped = registered_methods([m.strip() for m in a.methods.split(",") if m.strip()])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    results = {m: measure(m, a.steps, a.limit, a.set) for m in methods}
    rows = []
    for m, r in results.items():
        stages = len(r["checkpoints"])
        ratio = r["adapter_file_ratio"]
        goal = verdict(ratio, "<=", GOAL) if (ratio is not None and m in PEFT) else "-"
        rows.append([m, r["status"], r["trainable_params"], (r["trainable_param_bytes"] or 0) / 1024,
                     stages, (r["extra_state_bytes"] or 0) / 1024,
                     max((c["files"]["trainable.safetensors"] for c in r["checkpoints"]), default=0) / 1024,
                     max((c["total_bytes"] for c in r["checkpoints"]), default=0) / 1024,
                     ratio if ratio is not None else "-", r["stage_folder_ratio"] or "-", goal, r["peak_memory_mb"]])
    print(f"\ntiny-world, {a.steps} steps per stage, eval.limit={a.limit}; one process per method")
    print(fmt_table(rows, ["method", "status", "trainable", "param kB", "stages", "non-param state kB",
                           "adapter file kB",
                           "stage folder kB", "file/params", "folder/params", f"<= {GOAL}x (PEFT)",
                           "peak MB"]))
    write_result("memory", {"goal": f"stage checkpoint <= {GOAL}x trainable parameter bytes (PEFT methods)",
                            "steps": a.steps, "limit": a.limit, "skipped": skipped, "results": results})
    return results


if __name__ == "__main__":
    main()
