"""Compare two results folders run record by run record: are the numbers bit-for-bit identical?

A change that is not meant to change numbers (a refactor) must reproduce the published records exactly. Re-run
the published runs into a fresh folder, then compare::

    python scripts/publish_results.py --output /tmp/again --skip-readme          # (or a --methods/--seeds subset)
    python scripts/compare_records.py results/tiny-world /tmp/again

Every field of every record present in both folders is compared with ``==`` on the parsed JSON (floats
exactly), except

* what a run measures about its own execution: wall-clock seconds, peak memory, the git commit, the
  package/machine report and the process's resume history;
* the sweep around the run (``config.output``, ``methods``, ``seeds``, ``shard``, ``reference``,
  ``method_options``): the other runs of the same command, not this run's inputs (``method_config`` is compared);
* the evaluation-cache keys and the per-sample file names derived from them (``stages[].model_key``,
  ``rank_model_keys``, ``samples``, ``base_samples``): they hash the method's and the evaluator's source code on
  purpose (a changed scorer must not hit an old cache entry), so any edit of that code changes them while the
  weights and scores stay the same. The weights are checked through what they produce: every score of R and G,
  every stage's final loss and token count, the diagnostics and the base model's weight hash.

CPU results depend on the instruction set torch's kernels use (``env.cpu_capability``: AVX2, AVX512): records
made on an AVX2 machine are reproduced on an AVX512 one with ``ATEN_CPU_CAPABILITY=avx2`` and a fresh
``FORGETBENCH_CACHE`` (the tiny-world base is pretrained again under it); the script says so when they differ.

Lists of per-stage entries (``stages``, ``diagnostics``) are matched by their ``stage`` number, so an entry only
one side has is named as such. Exit status 0 when every compared record is identical, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# fields that describe the execution, not the result (seconds differ run to run; git/env name the code and host)
VOLATILE = {"git", "env", "resumed_from", "train_seconds", "eval_seconds", "wall_seconds", "peak_memory_mb",
            "traceback"}
CODE_KEYED = {"model_key", "rank_model_keys", "samples", "base_samples"}  # hash the source code by design
SKIPPED = VOLATILE | CODE_KEYED
# the sweep a run was part of, not the run: where it was written and which other runs shared the command
SWEEP = {"config.output", "config.methods", "config.seeds", "config.shard", "config.reference",
         "config.method_options"}


def _by_stage(entries: list[Any]) -> dict[str, Any] | None:
    """``{"stage 1": entry, ...}`` for a non-empty list of dicts that each carry a distinct ``stage``; else None."""
    if not entries or not all(isinstance(e, dict) and "stage" in e for e in entries):
        return None
    keyed = {f"stage {e['stage']}": e for e in entries}
    return keyed if len(keyed) == len(entries) else None


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths (``stages.stage 2.final_loss``) where ``a`` and ``b`` differ, skipping :data:`SKIPPED` keys."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            path = f"{where}.{k}" if where else str(k)
            if k in SKIPPED or path in SWEEP:
                continue
            if k not in a or k not in b:
                out.append(f"{path}: only in {'first' if k in a else 'second'}")
            else:
                out += differences(a[k], b[k], path)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if _by_stage(a) is not None and _by_stage(b) is not None:
            return differences(_by_stage(a), _by_stage(b), where)
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if type(a) is not type(b) or a != b:
        return [f"{where}: {a!r} vs {b!r}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="results folder (holds runs/*.json), e.g. the published one")
    p.add_argument("second", help="results folder to compare with it")
    p.add_argument("--require-all", action="store_true",
                   help="fail unless every record of FIRST is also in SECOND")
    p.add_argument("--allow-added", action="store_true",
                   help="a field only SECOND has (a record that now says more) is listed, not a difference")
    args = p.parse_args(argv)
    runs = [Path(d, "runs") for d in (args.first, args.second)]
    for r in runs:
        if not r.is_dir():
            print(f"error: no run records folder {str(r)!r}", file=sys.stderr)
            return 2
    first = {f.name: f for f in sorted(runs[0].glob("*.json"))}
    second = {f.name: f for f in sorted(runs[1].glob("*.json"))}
    common = sorted(set(first) & set(second))
    bad, capabilities = 0, set()
    for name in common:
        a, b = json.loads(first[name].read_text()), json.loads(second[name].read_text())
        capabilities.add(((a.get("env") or {}).get("cpu_capability"), (b.get("env") or {}).get("cpu_capability")))
        diffs = differences(a, b)
        added = [d for d in diffs if d.endswith(": only in second")] if args.allow_added else []
        diffs = [d for d in diffs if d not in added]
        print(f"{'identical' if not diffs else 'DIFFERENT'}  {name}" + (f" (+ {len(added)} added)" if added else ""))
        for d in diffs[:20] + [f"added {d.removesuffix(': only in second')}" for d in added]:
            print(f"    {d}")
        bad += bool(diffs)
    for want, got in sorted(c for c in capabilities if c[0] and c[1] and c[0] != c[1]):
        # torch picks its CPU kernels by instruction set, and their float results differ: rerun under the same one
        print(f"note: records made with CPU capability {want}, compared ones with {got}; rerun with "
              f"ATEN_CPU_CAPABILITY={want.lower()} (and a fresh FORGETBENCH_CACHE) to reproduce them exactly")
    missing = sorted(set(first) - set(second))
    print(f"{len(common)} records compared: {len(common) - bad} identical, {bad} different; "
          f"{len(missing)} of the first folder's records not in the second")
    return 1 if bad or (args.require_all and missing) or not common else 0


if __name__ == "__main__":
    sys.exit(main())
