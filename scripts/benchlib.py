"""Helpers shared by the ``scripts/bench_*.py`` benchmarks (not part of the library).

Timing on a shared machine: variants run interleaved round by round (A, B, C, A, B, C, ...) after a warm-up, so
a change of machine load hits all of them alike. Ratios are reported two ways: of the per-variant medians, and
"paired" (the median over rounds of the ratio within one round), which is the robust one under drifting load.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "results" / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def offline_env() -> None:
    """The harness's offline defaults (set before any Hugging Face import) and its quiet library loggers."""
    import logging

    from benchmark.cli import OFFLINE_VARS

    for k, v in OFFLINE_VARS.items():
        os.environ.setdefault(k, v)
    for noisy in ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def device_and_dtype(device: str, dtype: str) -> tuple[Any, Any, Callable[[], None]]:
    """(torch device, torch dtype, synchronise function) from ``--device cpu|cuda`` and ``--dtype fp32|bf16``."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch.device(device), dt, sync


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                sync: Callable[[], None] = lambda: None,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each variant: ``warmup`` untimed calls each, then ``rounds`` interleaved rounds.

    ``cpu``, when given, is filled with the process CPU seconds of each timed call as well (all threads summed:
    with one torch thread, the compute time without the waits for a core that a loaded machine adds)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {k: [] for k in variants}
    if cpu is not None:
        cpu.update({k: [] for k in variants})
    for _ in range(rounds):
        for k, fn in variants.items():
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[k].append(time.process_time() - c0)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items() if v}


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def ratio_row(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """``{"of_medians": ..., "paired": ...}`` for ``num / den``."""
    med = medians(times)
    return {"of_medians": med[num] / med[den], "paired": paired_ratio(times, num, den)}


def verdict(value: float, op: str, goal: float) -> str:
    ok = value <= goal if op == "<=" else value >= goal
    return "ok" if ok else "MISSED"


def environment() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_result(name: str, record: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``results/bench/<name>.json`` (or ``out``) and print where."""
    path = out or BENCH_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "env": environment(), **record}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def registered_methods(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """(names registered and importable, {skipped name: why}) among ``wanted``, via the method registry."""
    from methods import METHODS

    ok, skipped = [], {}
    names = set(METHODS.names())
    for name in wanted:
        if name not in names:
            skipped[name] = "not registered"
            continue
        try:
            cls = METHODS.get(name)
            cls(cls.config_cls())
        except Exception as exc:  # a plugin being written may not import or build yet: skip it, say why
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        ok.append(name)
    return ok, skipped


def run_child(args: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> tuple[float, str, int]:
    """Run ``python <args>`` from the repository root; (wall seconds incl. interpreter start, output, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return time.perf_counter() - t0, proc.stdout + proc.stderr, proc.returncode


def probe_run(cli_args: list[str], probe_args: list[str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``python -m benchmark <cli_args>`` under ``scripts/harness_probe.py``: its timings and the outside wall time."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fb-probe-") as tmp:
        path = Path(tmp) / "probe.json"
        wall, output, code = run_child(["scripts/harness_probe.py", str(path), *(probe_args or []), "--", *cli_args],
                                       timeout=timeout)
        if code != 0 or not path.is_file():
            raise SystemExit(f"harness run failed (exit {code}): python -m benchmark {' '.join(cli_args)}\n"
                             f"{output[-3000:]}")
        data = json.loads(path.read_text())
    data["wall_s"] = wall
    return data


def fmt_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[h for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
