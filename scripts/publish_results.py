"""Produce a published leaderboard (``results/<table>/``) from its run records and show it in the README.

Two tables, each every built-in method with 3 seeds plus the joint-training reference:

* ``tiny-world`` (default): the embedded tiny-world v2 sequence on the self-pretrained tiny-world model, one torch
  thread per process (tiny-world scores move with the thread count);
* ``smollm2-135m``: the same sequence on SmolLM2-135M-Instruct (``--model smollm2-135m``), sized for 2 CPU cores:
  batch 16, a tenth of the tiny-world steps, the first 50 examples of every evaluated task, and every method's
  tiny-world learning rate scaled by 0.1 (``train.lr_scale``).

It runs what is missing, rebuilds the leaderboard, CSVs, plots and HTML report from the run records, and replaces
the table's block in the README (between ``<!-- results:start -->`` and ``<!-- results:end -->``, or
``results-smollm2-135m:start/end``; appended when missing).

    python scripts/publish_results.py                          # the tiny-world table
    python scripts/publish_results.py --table smollm2-135m     # the SmolLM2 table
    python scripts/publish_results.py --table smollm2-135m --shard 1/2 --skip-readme   # one of two processes
    python scripts/publish_results.py --dry-run                # print what would run, write nothing
    python scripts/publish_results.py --skip-run               # only rebuild tables, plots and the README block
    python scripts/publish_results.py --tiny --output /tmp/smoke   # seconds: a tiny model, 3 steps per stage

Finished runs are skipped when the command is repeated (the runner resumes), so an interrupted publication
continues where it stopped, and two ``--shard K/2`` processes split the runs between 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUILTIN = ["full_ft", "lora", "lora_mlp", "loramoe", "slim", "hilo", "replay", "replay_general", "ewc", "lwf", "olora", "dora"]
# table -> (README marker, extra run options, one-line description of the setting)
TABLES: dict[str, tuple[str, list[str], str]] = {
    "tiny-world": ("results", [], "the tiny-world model, every method at its default (chosen on tiny-world-val)"),
    "smollm2-135m": ("results-smollm2-135m",
                     ["--model", "smollm2-135m", "--set", "train.batch_size=16", "--set", "train.steps_scale=0.1",
                      "--set", "train.lr_scale=0.1", "--set", "eval.limit=50", "--set", "eval.batch_size=32"],
                     "SmolLM2-135M-Instruct, batch 16, a tenth of the tiny-world steps, every method's tiny-world lr "
                     "x 0.1 (`train.lr_scale`), the first 50 examples of every evaluated task"),
}
# a recipe small enough to pretrain in seconds (same as the test suite's): checks the pipeline, not the numbers
TINY = ["model.pretrain.hidden_size=32", "model.pretrain.num_layers=2", "model.pretrain.num_heads=2",
        "model.pretrain.intermediate_size=64", "model.pretrain.vocab_size=400", "model.pretrain.max_steps=20",
        "model.pretrain.eval_every=20", "model.pretrain.batch_size=16", "train.max_steps=3", "train.batch_size=8",
        "eval.limit=6", "eval.batch_size=16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="tiny-world", choices=sorted(TABLES), help="which published table")
    p.add_argument("--output", default=None, help="results directory (default: results/<table>)")
    p.add_argument("--shard", default=None, help="K/N: run only this process's share of the runs")
    p.add_argument("--skip-readme", action="store_true", help="do not touch the README (e.g. in a shard)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered built-in "
                                                   f"of {','.join(BUILTIN)})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, fixed for reproducibility (default 1: the published results)")
    p.add_argument("--no-reference", action="store_true", help="skip the joint-training reference runs")
    p.add_argument("--readme", default=None, help="README to update (default: README.md; none with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model and 3 steps per stage: a smoke test in seconds")
    p.add_argument("--skip-run", action="store_true", help="do not train: rebuild from the existing run records")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    return p.parse_args(argv)


def available_methods(requested: str | None) -> tuple[list[str], list[str]]:
    """(methods to run, built-ins that are not registered) — the MoE methods may not all exist yet."""
    from methods import METHODS

    names = set(METHODS.names())
    if requested:
        return [m.strip() for m in requested.split(",") if m.strip()], []
    return [m for m in BUILTIN if m in names], [m for m in BUILTIN if m not in names]


def run_argv(args: argparse.Namespace, methods: list[str], output: Path) -> list[str]:
    """The ``python -m benchmark`` arguments of the publication run."""
    argv = ["-q", "run", "--methods", ",".join(methods), "--seeds", args.seeds, "--output", str(output),
            "--set", f"num_threads={args.threads}"] + TABLES[args.table][1]
    if args.shard:
        argv += ["--shard", args.shard]
    if not args.no_reference:
        argv += ["--reference", "joint"]
    for s in TINY if args.tiny else []:
        argv += ["--set", s]
    return argv


START, END = "<!-- results:start -->", "<!-- results:end -->"  # the tiny-world table's markers


def markers(table: str) -> tuple[str, str]:
    """The README start and end markers of a table's block."""
    name = TABLES[table][0]
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def results_block(output: Path, readme: Path, seeds: str, threads: int, table: str = "tiny-world") -> str:
    """The README block: the trade-off plot(s) and the Markdown leaderboard, with links to the rest."""
    rel = lambda p: Path(os.path.relpath(p, readme.parent)).as_posix()  # noqa: E731
    images = sorted((output / "plots").glob("tradeoff--*.png"))
    board = (output / "leaderboard.md").read_text(encoding="utf-8").strip()
    start, end = markers(table)
    opt = "" if table == "tiny-world" else f" --table {table}"
    lines = [start, "<!-- generated by scripts/publish_results.py from the run records; do not edit by hand -->",
             f"Tiny-world v2 sequence on {TABLES[table][2]}; seeds {seeds}, `num_threads={threads}`, every built-in "
             f"method plus the joint-training reference (the upper bound). Reproduce with "
             f"`python scripts/publish_results.py{opt}` (finished runs are skipped; `--shard K/2` in two processes "
             f"halves the time on 2 cores).", ""]
    lines += [f"![downstream score vs. general forgetting]({rel(p)})" for p in images] + [""]
    lines += [board.replace("### ", "#### "), "",
              f"All columns: [`leaderboard.csv`]({rel(output / 'leaderboard.csv')}), per run: "
              f"[`runs.csv`]({rel(output / 'runs.csv')}), report: [`report.html`]({rel(output / 'report.html')}), "
              f"schema: [`results/README.md`]({rel(ROOT / 'results' / 'README.md')}).", end]
    return "\n".join(lines)


def update_readme(text: str, block: str, table: str = "tiny-world") -> str:
    """Replace the marked block of ``text`` by ``block`` (which carries the markers); append it when absent."""
    start_marker, end_marker = markers(table)
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(end_marker):]
    if start != -1 or end != -1:
        raise ValueError(f"README has only one of the markers {start_marker} / {end_marker}; fix it by hand")
    return text.rstrip("\n") + "\n\n## Published results\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output or ("outputs/publish-tiny" if args.tiny else ROOT / "results" / args.table))
    readme = Path(args.readme) if args.readme else (None if args.tiny or args.skip_readme else ROOT / "README.md")
    methods, missing = available_methods(args.methods)
    if missing:
        print(f"not registered (skipped): {', '.join(missing)}", file=sys.stderr)
    if not methods:
        print("error: no method to run", file=sys.stderr)
        return 2
    argv_run = run_argv(args, methods, output)
    if args.dry_run:
        print(f"methods: {', '.join(methods)}; seeds: {args.seeds}; output: {output}")
        print("would run: python -m benchmark " + " ".join(argv_run))
        print(f"would rebuild: python -m benchmark leaderboard --results {output}")
        print(f"would update: {readme if readme else '(no README)'} between {' and '.join(markers(args.table))}")
        return 0
    from benchmark.cli import main as cli
    from benchmark.records import atomic_write_text

    rc = 0 if args.skip_run else cli(argv_run)
    rc_lb = cli(["-q", "leaderboard", "--results", str(output)])
    if readme is not None:
        block = results_block(output, readme, args.seeds, args.threads, args.table)
        atomic_write_text(readme, update_readme(readme.read_text(encoding="utf-8"), block, args.table))
        print(f"updated {readme}")
    if rc:
        print(f"warning: some runs failed (exit code {rc}); the table shows them", file=sys.stderr)
    return rc or rc_lb


if __name__ == "__main__":
    sys.exit(main())
