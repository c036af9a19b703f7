"""``--shard K/N``: split a sweep across machines by a deterministic round-robin over the plan order.

Shard K of N runs the plan's runs at positions K-1, K-1+N, K-1+2N, ... of ``[(method, seed) for method in
methods for seed in seeds]``. Every machine computes the same list from the same command, so the N shards
together run each (method, seed) exactly once; ``python -m benchmark leaderboard --results DIR1 DIR2 ...`` merges
their result folders afterwards.
"""

from __future__ import annotations

import re
from typing import TypeVar

from benchmark.errors import UserError

T = TypeVar("T")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``; anything else is a one-line :class:`UserError`."""
    m = _SHARD.match(str(text))
    if not m:
        raise UserError(f"invalid shard {text!r}: expected K/N with 1 <= K <= N, e.g. 1/4")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise UserError(f"invalid shard {text!r}: expected K/N with 1 <= K <= N, e.g. 1/4")
    return k, n


def shard_slice(items: list[T], shard: str | None) -> list[T]:
    """The K-th of N round-robin slices of ``items`` (all items when ``shard`` is None)."""
    if shard is None:
        return list(items)
    k, n = parse_shard(shard)
    return list(items[k - 1::n])
