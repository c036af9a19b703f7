"""HiLo allocation policies as plain functions: per-layer expert counts and ranks (docs/methods.md §2.2-2.4).

Schedules (the values of ``experts`` / ``ranks`` in :class:`~methods.hilo.config.HiloConfig`):

- **grouped** ``"2468"`` (one digit per group) or ``"2-4-6-8"`` / ``"2,4,6,8"`` (any integers): the model's
  ``L`` decoder layers are split into ``G`` contiguous groups, low to high (MoLA's expert layout, HiLo's "2468"
  rank layout). Layer ``l`` (0-based) belongs to group ``g(l) = floor((2l + 1) * G / (2L))``, the group that
  contains the layer's mid-depth ``(l + 1/2) / L``. Where ``G`` divides ``L`` this is ``floor(l * G / L)``
  (``L = 32``: 8 layers per group). Otherwise the groups stay contiguous and non-decreasing, none is empty when
  ``L >= G`` and their sizes differ by at most one (``L = 6``: ``2468 -> 2, 4, 4, 6, 8, 8``; a mid-depth exactly
  on a group boundary goes to the upper group). When ``L < G`` each layer takes the value at its mid-depth
  (``L = 3``: ``-> 2, 6, 8``; ``L = 2``: ``-> 4, 8``; ``L = 1``: ``-> 6``), so the shallowest layer never gets
  more than the deepest and both ends of the schedule stay in use where ``L >= 2``.
- **uniform** ``"uniform5"`` (or ``"uniform:5"``, or the single digit ``"5"``): one value for every layer.
- **explicit** ``[n_0, ..., n_{L-1}]``: one value per layer.
- **alpha_hill** (expert counts only): AlphaLoRA's training-free allocation, :func:`alpha_hill_allocation`.

A YAML integer such as ``2468`` (what ``--set methods.hilo.ranks=2468`` gives) is read as its digit string.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

ALPHA_HILL = "alpha_hill"
WINDOWS = ("alphalora", "peak", "none")
FIXUPS = ("alphalora", "largest_remainder")
SCHEDULE_FORMS = ("'2468' (one digit per layer group)", "'2-4-6-8' or '2,4,6,8' (layer groups)",
                  "'uniform<N>'", "a per-layer list [n_0, ..., n_{L-1}]")


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: ``kind`` is ``"grouped"``, ``"uniform"``, ``"explicit"`` or ``"alpha_hill"``."""

    kind: str
    values: tuple[int, ...] = ()


def parse_schedule(spec: str | int | Sequence[int], what: str, allow_alpha_hill: bool = False) -> Schedule:
    """Parse a schedule value (see the module docstring); ``ValueError`` names the bad value and the valid forms."""
    forms = ", ".join(SCHEDULE_FORMS + (("'alpha_hill'",) if allow_alpha_hill else ()))
    bad = ValueError(f"Invalid {what}: {spec!r}; valid forms: {forms}; every value an integer >= 1")
    if isinstance(spec, bool):
        raise bad
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in spec):
            raise bad
        return Schedule("explicit", tuple(spec))
    if not isinstance(spec, str):
        raise bad
    text = spec.strip().lower()
    if text == ALPHA_HILL:
        if not allow_alpha_hill:
            raise bad
        return Schedule("alpha_hill")
    m = re.fullmatch(r"uniform:?(\d+)", text)
    if m:
        values: tuple[int, ...] = (int(m.group(1)),)
        kind = "uniform"
    elif re.fullmatch(r"\d+", text):
        values, kind = tuple(int(c) for c in text), "grouped"
    elif re.fullmatch(r"\d+([-,]\d+)+", text):
        values, kind = tuple(int(v) for v in re.split(r"[-,]", text)), "grouped"
    else:
        raise bad
    if min(values) < 1:
        raise bad
    if kind == "grouped" and len(values) == 1:
        kind = "uniform"
    return Schedule(kind, values)


def layer_group(layer: int, num_layers: int, num_groups: int) -> int:
    """Group (0-based) of ``layer`` among ``num_layers``: the group holding the layer's mid-depth."""
    if not 0 <= layer < num_layers or num_groups < 1:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers / {num_groups} groups")
    return ((2 * layer + 1) * num_groups) // (2 * num_layers)


def grouped_schedule(values: Sequence[int], num_layers: int) -> list[int]:
    """Per-layer values of a grouped schedule, e.g. ``grouped_schedule([2, 4, 6, 8], 32)`` -> 8x2, 8x4, 8x6, 8x8."""
    return [int(values[layer_group(i, num_layers, len(values))]) for i in range(num_layers)]


def resolve_schedule(schedule: Schedule, num_layers: int, what: str) -> list[int]:
    """Per-layer values of a grouped / uniform / explicit schedule (``alpha_hill`` needs the weights)."""
    if schedule.kind == "uniform":
        return [schedule.values[0]] * num_layers
    if schedule.kind == "grouped":
        return grouped_schedule(schedule.values, num_layers)
    if schedule.kind == "explicit":
        if len(schedule.values) != num_layers:
            raise ValueError(f"Invalid {what}: a per-layer list of {len(schedule.values)} values for a model with "
                             f"{num_layers} layers")
        return list(schedule.values)
    raise ValueError(f"{what}: schedule {schedule.kind!r} cannot be resolved without the model's weights")


# -- AlphaLoRA: PL_Alpha_Hill of every weight, then experts proportional to alpha^beta ----------------------
def pl_alpha_hill(weight: torch.Tensor, bins: int = 100, window: str = "alphalora") -> float:
    """Power-law exponent of the eigenvalue spectrum of ``W^T W`` by the Hill estimator (AlphaLoRA ``fix_finger``).

    The eigenvalues ``lambda = svdvals(W)**2`` (fp32 SVD, statistics in fp64) are sorted ascending. For a lower
    cutoff ``xmin = lambda_i`` the Hill estimate over the ``n = N - i`` eigenvalues ``>= xmin`` is
    ``alpha_i = 1 + n / (sum_{j>=i} log lambda_j - n log xmin)``; the cutoff minimising the Kolmogorov-Smirnov
    distance ``max_j |1 - (lambda_j / xmin)^(1 - alpha_i) - (j - i) / n|`` is kept. Candidate cutoffs are
    limited to a window around the peak ``p`` (left edge of the fullest bin of a ``bins``-bin histogram of
    ``log10 lambda``):

    - ``"alphalora"``: ``log10(0.95 p) <= xmin <= 1.5 p`` -- the AlphaLoRA/TempBalance code as written, which
      compares a log10 lower bound with raw eigenvalues (docs/methods.md §2.2), so the lower bound rarely binds;
    - ``"peak"``: ``0.95 p <= xmin <= 1.5 p`` (the evident intent);
    - ``"none"``: every eigenvalue but the largest.

    The largest eigenvalue is never a cutoff. Non-positive eigenvalues (exactly rank-deficient weights) are
    dropped, and an empty window falls back to ``"none"`` (the code would return 0 there); both are deviations
    that only matter for degenerate matrices.
    """
    if window not in WINDOWS:
        raise ValueError(f"Invalid window: {window!r}; valid: {', '.join(WINDOWS)}")
    eigs32 = torch.linalg.svdvals(weight.detach().float()).square()
    eigs = eigs32.double().sort().values
    eigs = eigs[eigs > 0]
    n_eig = eigs.numel()
    if n_eig < 2:
        raise ValueError(f"need at least 2 positive eigenvalues for a power-law fit, got {n_eig}")
    cand = torch.arange(n_eig - 1, device=eigs.device)
    if window != "none":
        logs10 = torch.log10(eigs)
        lo_e, hi_e = logs10.min(), logs10.max()
        counts = torch.histc(logs10.float(), bins, min=float(lo_e), max=float(hi_e))
        edges = torch.linspace(float(lo_e), float(hi_e), bins + 1, dtype=torch.float64, device=eigs.device)
        peak = 10 ** edges[int(counts.argmax())]
        lower = torch.log10(0.95 * peak) if window == "alphalora" else 0.95 * peak
        inside = cand[(eigs[:-1] >= lower) & (eigs[:-1] <= 1.5 * peak)]
        if inside.numel():
            cand = inside
        else:
            logger.debug("pl_alpha_hill: empty %s window, scanning every cutoff", window)
    logs = eigs.log()
    suffix = logs.flip(0).cumsum(0).flip(0)  # suffix[i] = sum_{j >= i} log lambda_j
    ns = (n_eig - cand).double()
    alphas = 1 + ns / (suffix[cand] - ns * logs[cand])
    dists = torch.ones_like(alphas)
    ok = torch.isfinite(alphas) & (alphas > 1)
    for start in range(0, cand.numel(), 256):  # chunks bound the (candidates x eigenvalues) KS matrix
        sl = slice(start, start + 256)
        c, a, n = cand[sl], alphas[sl], ns[sl]
        j = torch.arange(n_eig, device=eigs.device)
        rel = j[None, :] - c[:, None]  # position j - i of eigenvalue j above cutoff i
        valid = rel >= 0
        ratio = (eigs[None, :] / eigs[c][:, None]).clamp_min(1.0)
        cdf_fit = 1 - ratio ** (1 - a[:, None])
        gap = (cdf_fit - rel.clamp_min(0) / n[:, None]).abs().masked_fill(~valid, 0.0)
        dists[sl] = torch.where(ok[sl], gap.max(dim=1).values, dists[sl])
    return float(alphas[int(dists.argmin())])


def allocate_experts(scores: Sequence[float], total: int, beta: float = 2.5, fixup: str = "largest_remainder",
                     min_experts: int = 1) -> list[int]:
    """AlphaLoRA's allocation ``n_l = round(total * s_l^beta / sum_k s_k^beta)``, fixed up so ``sum n_l = total``.

    ``round`` is numpy's (half to even), as in the AlphaLoRA code. Fix-ups, one expert at a time, while the sum
    is off:

    - ``"alphalora"`` (the code's ``exponential_scaling``): add to ``argmin(s^beta - n)`` / remove from
      ``argmax(s^beta - n)``, comparing the *unnormalised* ``s^beta`` with the counts;
    - ``"largest_remainder"``: add where the ideal share ``total * s^beta / sum`` exceeds ``n`` the most,
      remove where ``n`` exceeds it the most.

    The code's rule is not a rounding rule: when short it adds to the layer with the smallest ``s^beta - n``
    (often a low-score layer): scores ``(2, 2.5, 4)``, ``total = 12`` (ideal shares 1.43, 2.49, 8.08) give
    ``[2, 2, 8]`` where the largest remainder gives ``[1, 3, 8]``; it can even give a lower-score layer more
    experts than a higher-score one (scores ``(1.512, 1.651, 5.171, 5.358, 5.708)``, ``total = 24``,
    ``beta = 4`` -> ``[1, 1, 7, 8, 7]``), against AlphaLoRA's own principle. The largest remainder never does
    (it is monotone in the score), so it is the plugin's default; ``"alphalora"`` reproduces the code's numbers.

    Every layer keeps at least ``min_experts`` (the code has no floor; a layer with 0 experts cannot exist).
    """
    if fixup not in FIXUPS:
        raise ValueError(f"Invalid fixup: {fixup!r}; valid: {', '.join(FIXUPS)}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not s.size or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"scores must be finite positive numbers, got {list(scores)!r}")
    if total < min_experts * s.size:
        raise ValueError(f"Invalid total: {total} experts cannot give {s.size} layers {min_experts} each")
    powered = np.power(s, beta)
    ideal = powered / powered.sum() * total
    n = np.maximum(np.round(ideal).astype(int), min_experts)
    while n.sum() != total:
        short = n.sum() < total
        if fixup == "alphalora" and short:  # the code's rule, kept as written
            n[int(np.argmin(powered - n))] += 1
        elif fixup == "alphalora":
            n[int(np.argmax(np.where(n > min_experts, powered - n, -np.inf)))] -= 1
        elif short:  # ties (equal shares) go to the higher score, removals to the lower one
            n[int(np.lexsort((s, ideal - n))[-1])] += 1
        else:
            n[int(np.lexsort((-s, np.where(n > min_experts, n - ideal, -np.inf)))[-1])] -= 1
    return [int(v) for v in n]


def default_total(num_layers: int) -> int:
    """AlphaLoRA's T = 160 for 32 layers, scaled to the depth: 5 experts per layer on average (= MoLA's 2468)."""
    return 5 * num_layers


# -- closed-form parameter counts (docs/methods.md §2.4) ---------------------------------------------------------
def closed_form_counts(modules: Sequence[tuple[int, int, int]], experts: Sequence[int], ranks: Sequence[int],
                       top_k: Sequence[int], n_null: int = 0) -> dict[str, int]:
    """Trainable and active adapter parameters from the allocation alone.

    ``modules`` holds ``(layer, d_in, d_out)`` of every adapted linear. Per module of layer ``l``:
    trainable ``N_l r_l (d_in + d_out) + d_in (N_l + n_null)`` (LoRA experts + router); active per token
    ``min(k_l, N_l) r_l (d_in + d_out) + d_in (N_l + n_null)`` -- ``k_l`` selected experts of rank ``r_l`` (an
    upper bound with null experts, which cost nothing) plus the whole router.
    """
    trainable = active = 0
    for layer, d_in, d_out in modules:
        n, r, k = experts[layer], ranks[layer], min(top_k[layer], experts[layer])
        router = d_in * (n + n_null)
        trainable += n * r * (d_in + d_out) + router
        active += k * r * (d_in + d_out) + router
    return {"trainable": trainable, "active": active}
