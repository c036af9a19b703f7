"""Command line: ``python -m benchmark {run,ls,leaderboard}`` (argparse subcommands, comma-separated lists)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmark.errors import UserError

logger = logging.getLogger("benchmark")
OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0",
                "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seeds {text!r}: expected comma-separated integers, e.g. 0,1,2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgetbench", description="Continual fine-tuning benchmark: "
                                "downstream score versus forgetting of general knowledge.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fine-tune a base model on a task sequence, once per method and seed")
    what = run.add_argument_group("what to run")
    what.add_argument("--methods", type=_csv, help="comma-separated method names (default: full_ft,lora)")
    what.add_argument("--sequence", help="sequence name (default: tiny-world)")
    what.add_argument("--model", help="hub id or local path of a causal LM (default: the tiny-world model)")
    what.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: 0)")
    how = run.add_argument_group("how")
    how.add_argument("--output", help="results directory (default: outputs/)")
    how.add_argument("--config", help="YAML experiment config")
    how.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. train.lr=3e-4 or methods.lora.r=16 (repeatable)")
    how.add_argument("--limit", type=int, help="evaluate at most N examples per task (quick checks)")
    how.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    how.add_argument("--dry-run", action="store_true", help="print the plan (methods x seeds x stages) and exit")

    ls = sub.add_parser("ls", help="list registered methods, tasks or sequences and where each came from")
    ls.add_argument("what", choices=["methods", "tasks", "sequences"])

    lb = sub.add_parser("leaderboard", help="rebuild the leaderboard, CSVs and plots from run records")
    lb.add_argument("--results", nargs="+", required=True, help="result directories to merge")
    lb.add_argument("--output", help="where to write (default: the first results directory)")
    return p


def _needs_network(args: argparse.Namespace, base: dict[str, Any]) -> bool:
    """Only a hub model asked for by the user may touch the network; everything else runs offline."""
    name = args.model or (base.get("model") or {}).get("name")
    return bool(name) and name != "tiny-world" and not Path(name).expanduser().exists()


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.config import load_yaml, make_config

    base: dict[str, Any] = load_yaml(args.config) if args.config else {}
    if not _needs_network(args, base):
        for k, v in OFFLINE_VARS.items():
            os.environ.setdefault(k, v)
    if args.methods is not None:
        base["methods"] = args.methods
    if args.seeds is not None:
        base["seeds"] = args.seeds
    for key, value in (("sequence", args.sequence), ("output", args.output)):
        if value is not None:
            base[key] = value
    model = dict(base.get("model") or {})
    if args.model is not None:
        model["name"] = args.model
    if args.trust_remote_code:
        model["trust_remote_code"] = True
    if model:
        base["model"] = model
    if args.limit is not None:
        base.setdefault("eval", {})["limit"] = args.limit
    cfg = make_config(base, args.set)

    from benchmark.runner import describe, make_plan, run_experiment

    if args.dry_run:
        print(describe(make_plan(cfg)))
        return 0
    return run_experiment(cfg, quiet=args.quiet)


def cmd_ls(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from methods import METHODS as reg
    else:
        from tasks import SEQUENCES, TASKS

        reg = TASKS if args.what == "tasks" else SEQUENCES
    width = max((len(n) for n in reg.names()), default=0)
    for name in reg.names():
        extra = ""
        if args.what == "tasks":
            spec = reg.get(name)
            extra = f"  [{getattr(spec, 'group', '?')}, {getattr(spec, 'kind', '?')}]"
        print(f"{name:<{width}}  {reg.origin(name)}{extra}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.leaderboard import write_all

    for d in args.results:
        if not Path(d, "runs").is_dir():
            raise UserError(f"not a results directory (no runs/ folder): {d!r}")
    out = args.output or args.results[0]
    df = write_all(out, args.results)
    print(f"{len(df)} leaderboard rows -> {Path(out) / 'leaderboard.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmark`` and the ``forgetbench`` script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.verbose else logging.INFO)
    try:
        return {"run": cmd_run, "ls": cmd_ls, "leaderboard": cmd_leaderboard}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
