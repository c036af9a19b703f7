"""Choose each method's default learning rate on the tiny-world validation sequence, never on test scores.

For every method and every lr of its grid, runs ``tiny-world-val`` (the same training files as ``tiny-world``;
evaluation on the validation prompts and the validation half of the general facts) with seed 0, then prints,
per method, the validation plasticity (mean score right after learning each task), final_avg and general_delta of
every lr, and picks the lr with the highest validation plasticity: each method is given the rate at which it
learns the tasks best, and its forgetting is what the benchmark then measures. Ties within 1 point go to the
smaller lr (less forgetting for the same learning).

    python scripts/tune_defaults.py                      # all built-in methods, into results/tuning/tiny-world
    python scripts/tune_defaults.py --methods lora,slim --shard 1/2   # one of two parallel processes

Finished runs are skipped, so the sweep resumes. The chosen values are the defaults in each method's config.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmark import metrics  # noqa: E402 - after the path set-up
from benchmark.records import load_records  # noqa: E402

logger = logging.getLogger("tune_defaults")
GRIDS: dict[str, list[float]] = {
    "full_ft": [1e-4, 3e-4, 1e-3],
    "lora": [1e-3, 3e-3, 1e-2],
    "lora_mlp": [1e-3, 3e-3, 1e-2],
    "loramoe": [1e-3, 3e-3, 1e-2],
    "slim": [1e-3, 3e-3, 1e-2],
    "hilo": [1e-3, 3e-3, 1e-2],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(GRIDS), help="comma-separated methods")
    p.add_argument("--output", default=str(ROOT / "results" / "tuning" / "tiny-world"))
    p.add_argument("--shard", default="1/1", help="K/N: run every N-th (method, lr) pair starting at K")
    p.add_argument("--report-only", action="store_true", help="do not train: print the table of existing runs")
    return p.parse_args(argv)


def run(method: str, lr: float, output: str) -> None:
    """One validation run (resumes / skips when it already finished)."""
    cmd = [sys.executable, "-m", "benchmark", "-q", "run", "--sequence", "tiny-world-val", "--methods", method,
           "--seeds", "0", "--set", "num_threads=1", "--set", f"methods.{method}.lr={lr:g}",
           "--output", output]
    logger.info("%s", " ".join(cmd[1:]))
    subprocess.run(cmd, check=False, cwd=ROOT)


def table(output: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> [(lr, plasticity, final_avg, general_delta)] over the finished validation runs."""
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for rec in load_records([output]):
        if rec.status != "success" or rec.sequence != "tiny-world-val":
            continue
        lr = rec.method_config.get("lr") or rec.config["train"]["lr"]
        vals = [metrics.plasticity(rec.R).value, metrics.final_avg(rec.R).value, metrics.general_delta(rec.G).value]
        out.setdefault(rec.method, []).append((float(lr), *[float(v) for v in vals]))
    return {m: sorted(rows) for m, rows in out.items()}


def pick(rows: list[tuple[float, float, float, float]]) -> float:
    """The lr with the best validation plasticity; within 1 point of the best, the smallest lr."""
    best = max(r[1] for r in rows)
    return min(r[0] for r in rows if r[1] >= best - 1.0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    k, n = (int(x) for x in args.shard.split("/"))
    pairs = [(m, lr) for m in args.methods.split(",") for lr in GRIDS[m]]
    if not args.report_only:
        for i, (m, lr) in enumerate(pairs):
            if i % n == k - 1:
                run(m, lr, args.output)
    for m, rows in table(args.output).items():
        logger.info("%s: chosen lr %g", m, pick(rows))
        for lr, plast, final, gdelta in rows:
            logger.info("  lr %-8g val plasticity %5.1f  final_avg %5.1f  general_delta %6.1f", lr, plast, final,
                        gdelta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
