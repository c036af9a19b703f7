"""Run ``python -m benchmark`` in this process with timers around its phases; write the timings as JSON.

Usage (what the bench scripts do): ``python scripts/harness_probe.py OUT.json [--sequence-of N] -- run ...``

Timed, by wrapping the functions where the harness spends time (inclusive seconds and call counts):

* training: ``benchmark.train.train_stage`` (whole call) and the step loops inside it (its ``StageStats.seconds``);
  ``benchmark.data.collate`` (batch building inside the loop);
* evaluation: ``benchmark.evaluate.evaluate`` (whole call) and the model calls lm-eval makes inside it
  (``HFLM._model_call`` for log-likelihoods, ``HFLM._model_generate`` for generation);
* set-up and bookkeeping: loading the base model, tokenising the training data, hashing for the evaluation
  cache, stage checkpoints (with their file sizes), run records and the leaderboard.

Log lines that contain "cache hit" are counted. ``--sequence-of N`` registers a temporary N-task sequence
``tw-bench-N`` made of the tiny-world downstream tasks, repeated under new names (``tw_add_r2`` ...) when N > 3.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

from benchlib import offline_env  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
EXTRA: dict[str, list] = defaultdict(list)


def _timed(label: str, fn, after=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - t0
            CALLS[label] += 1
        if after is not None:
            after(out, args, kwargs)
        return out

    wrapper.__wrapped_by_probe__ = True
    return wrapper


def patch(module, name: str, label: str, after=None) -> None:
    """Replace ``module.name`` by a timed wrapper, also where other loaded modules imported it by name."""
    original = getattr(module, name)
    wrapped = _timed(label, original, after)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(("benchmark", "methods", "tasks")) \
                and getattr(mod, name, None) is original:
            setattr(mod, name, wrapped)
    setattr(module, name, wrapped)


def _after_train(stats, args, kwargs) -> None:
    TIMES["train_loop"] += stats.seconds
    EXTRA["train_stages"].append({"steps": stats.steps, "loop_seconds": stats.seconds, "tokens": stats.tokens})


def _after_save(final, args, kwargs) -> None:
    """Sizes of a stage checkpoint against the bytes of the trainable parameters it stands for."""
    trainable = args[2] if len(args) > 2 else kwargs["trainable"]
    meta = args[4] if len(args) > 4 else kwargs["meta"]
    files = {p.name: p.stat().st_size for p in Path(final).iterdir() if p.is_file()}
    n_params = ((meta.get("record") or {}).get("costs") or {}).get("trainable_params")
    by_size: dict[int, int] = defaultdict(int)  # element size -> elements: the parameters' dtype holds the most
    for t in trainable.values():
        by_size[t.element_size()] += t.numel()
    itemsize = max(by_size, key=by_size.get) if by_size else 4
    EXTRA["checkpoints"].append({
        "stage": args[1] if len(args) > 1 else kwargs["stage"], "files": files, "total_bytes": sum(files.values()),
        "state_tensor_bytes": sum(t.numel() * t.element_size() for t in trainable.values()),
        "trainable_params": n_params, "trainable_param_bytes": n_params * itemsize if n_params else None})


class _CacheHits(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "cache hit" in msg:
            EXTRA["cache_hits"].append(msg)
        elif "pretraining the tiny-world base model" in msg:
            EXTRA["cache_misses"].append(msg)


def register_sequence(n: int) -> str:
    """A temporary ``tw-bench-<n>`` sequence of n downstream tasks built from the tiny-world ones."""
    import dataclasses

    from tasks import SEQUENCES, TASKS

    base = SEQUENCES.get("tiny-world")
    names = []
    for i in range(n):
        src = base.tasks[i % len(base.tasks)]
        name = src if i < len(base.tasks) else f"{src}_r{i // len(base.tasks) + 1}"
        if name not in TASKS:
            TASKS.register(name, dataclasses.replace(TASKS.get(src), name=name), origin="bench")
        names.append(name)
    seq = dataclasses.replace(base, name=f"tw-bench-{n}", tasks=names,
                              steps={t: base.steps.get(t.rsplit("_r", 1)[0], 0) for t in names
                                     if t.rsplit("_r", 1)[0] in base.steps})
    SEQUENCES.register(seq.name, seq, origin="bench")
    return seq.name


def main() -> int:
    out = Path(sys.argv[1])
    rest = sys.argv[2:]
    seq_n = None
    if rest[:1] == ["--sequence-of"]:
        seq_n, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    offline_env()
    t_imports = time.perf_counter()
    import benchmark.checkpoint
    import benchmark.data
    import benchmark.evalcache
    import benchmark.evaluate
    import benchmark.models
    import benchmark.records
    import benchmark.runner
    import benchmark.stages
    import benchmark.train
    from benchmark.cli import main as cli_main
    from lm_eval.models.huggingface import HFLM

    if seq_n is not None:
        rest = rest + ["--sequence", register_sequence(seq_n)]
    TIMES["probe_imports"] = time.perf_counter() - t_imports
    patch(benchmark.train, "train_stage", "train_stage", _after_train)
    patch(benchmark.data, "collate", "collate")
    patch(benchmark.data, "encode_task", "tokenise")
    patch(benchmark.evaluate, "evaluate", "evaluate")
    patch(benchmark.models, "load_base", "load_base")
    patch(benchmark.models, "tinyworld_path", "base_model_path")
    patch(benchmark.evalcache, "model_hash", "hash_model")
    patch(benchmark.evalcache, "stage_model_key", "hash_stage")
    patch(benchmark.checkpoint, "save_stage", "checkpoint", _after_save)
    patch(benchmark.runner, "write_leaderboard", "leaderboard")
    patch(benchmark.records, "write_json", "write_json")
    HFLM._model_call = _timed("eval_model_call", HFLM._model_call)
    HFLM._model_generate = _timed("eval_model_generate", HFLM._model_generate)
    logging.getLogger("benchmark").addHandler(_CacheHits())
    t_main = time.perf_counter()
    code = cli_main(rest)
    t_end = time.perf_counter()
    out.write_text(json.dumps({
        "argv": rest, "exit_code": code, "before_main_s": t_main - T_START, "main_s": t_end - t_main,
        "process_s": t_end - T_START, "times": dict(TIMES), "calls": dict(CALLS), **{k: v for k, v in EXTRA.items()},
    }, indent=1) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
