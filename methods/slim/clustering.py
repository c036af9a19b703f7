"""Sliding clustering (SLIM §3.3): per adapted linear, M centres and per-channel variances of its input.

The statistics are fp32 buffers, never trained by gradients. A training forward only *collects* per-cluster
sums of the real (non-padding) tokens; :func:`update_clusters` (called from the method's ``on_step``) all-reduces
them across processes and applies one EMA update per optimiser step. Collecting in the forward and updating after
the step keeps every forward of a step (micro-batches, checkpoint recomputes) on the same clusters, makes the
result independent of ``grad_accum`` and of the number of processes, and costs one collective per step.

Update of cluster ``j`` from the ``n_j`` tokens assigned to it (``delta = x - c_j``, means over those tokens)::

    c_j     <- c_j + m * mean(delta)                                = (1 - m) c_j + m mean(x)
    var_j   <- (1 - m) var_j + m * mean((x - c_j_new)^2)            (clamped >= min_std^2)
            =  (1 - m) var_j + m * (mean(delta^2) - (2m - m^2) mean(delta)^2)
    ratio   <- (1 - m) ratio + m * mean_tokens(max_c |x - c_idx| / sigma_idx)      (calibration of d)

The variance tracks the spread of the assigned tokens around the (updated) centre -- exactly what the distance
``|x - c| / sigma`` normalises -- rather than around their batch mean (methods.md's [D]), which would ignore a
lagging centre. Clusters that receive no token this step are left unchanged.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def nearest(x: torch.Tensor, centres: torch.Tensor, var: torch.Tensor, metric: str) -> torch.Tensor:
    """Index of the nearest centre for each row of ``x`` (T, C) in fp32; (T,) long.

    Uses the expanded form ``|x|^2 - 2 x.c + |c|^2`` (weighted by ``1/var`` for diagonal Mahalanobis), so memory is
    O(T*M) rather than O(T*M*C).
    """
    if metric == "euclidean":
        w = torch.ones_like(var)
    else:
        w = var.reciprocal()
    # the factor 2 scales the small (M, C) operand, not x: exact either way (a power of two), one (T, C) pass less
    d2 = (x * x) @ w.t() - x @ (2.0 * (centres * w)).t() + (centres * centres * w).sum(-1)
    return d2.argmin(dim=-1)


def max_ratio(x: torch.Tensor, idx: torch.Tensor, centres: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """SLIM's per-token ratio ``max_channel |x - c_idx| / sigma_idx`` (T,)."""
    return ratio_of(x - centres[idx], idx, std)


def ratio_of(delta: torch.Tensor, idx: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`max_ratio` from ``delta = x - c_idx``, which is left intact (the cluster update reuses it)."""
    # in place on the one new (T, C) buffer: on CPU every fresh buffer of this size costs page faults
    return delta.abs().div_(std[idx]).amax(dim=-1)


@torch.no_grad()
def kmeans_init(x: torch.Tensor, m: int, iters: int, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and variances (each (m, C), fp32) from tokens ``x`` (T, C): Lloyd's k-means, deterministic.

    Seeds are evenly spaced tokens; assignment uses Euclidean distance on features standardised by the global
    per-channel std (a shared diagonal metric). A cluster's variance is the mean squared deviation of its tokens
    from its centre; clusters with fewer than 2 tokens get the global variance.
    """
    x = x.float()
    t = x.shape[0]
    gvar = x.var(dim=0, unbiased=False).clamp_min(min_std**2) if t > 1 else torch.ones_like(x[0])
    seeds = torch.linspace(0, t - 1, m, device=x.device).round().long()
    centres = x[seeds].clone()
    z = x / gvar.sqrt()
    for _ in range(iters):
        idx = nearest(z, centres / gvar.sqrt(), torch.ones_like(centres), "euclidean")
        counts = torch.bincount(idx, minlength=m).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    idx = nearest(z, centres / gvar.sqrt(), torch.ones_like(centres), "euclidean")
    counts = torch.bincount(idx, minlength=m).to(x.dtype)
    sq = torch.zeros_like(centres).index_add_(0, idx, (x - centres[idx]) ** 2)
    var = torch.where(counts[:, None] >= 2, sq / counts.clamp_min(1)[:, None], gvar)
    return centres, var.clamp_min(min_std**2)


class SlidingClusters(nn.Module):
    """Clustering state of one adapted linear plus the weight-yielding settings that read it.

    Buffers (persistent, fp32, saved with the trainable state): ``centres`` (M, C), ``var`` (M, C), ``ratio``
    (running mean of ``max_c |x - c| / sigma`` over training tokens) and ``initialised``.
    """

    def __init__(self, dim: int, n_clusters: int, momentum: float, metric: str, min_std: float, init: str,
                 init_iters: int, gamma: float, calibrate: bool, clip: float | None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.n_clusters, self.momentum, self.metric = dim, n_clusters, momentum, metric
        self.min_std, self.init, self.init_iters = min_std, init, init_iters
        self.gamma, self.calibrate, self.clip = gamma, calibrate, clip
        f32 = {"device": device, "dtype": torch.float32}
        self.register_buffer("centres", torch.zeros(n_clusters, dim, **f32))
        self.register_buffer("var", torch.ones(n_clusters, dim, **f32))
        self.register_buffer("ratio", torch.ones((), **f32))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=device))
        self._pending: torch.Tensor | None = None  # (M, 2C + 1) sums of this step + ratio sum/count
        self._candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # data init, this rank
        # siblings that read the same input (gate_proj/up_proj): see :meth:`from_twin`; a plain list, so they are
        # not submodules and the state dict is unchanged
        self.twins: list[SlidingClusters] = []
        self._last: tuple | None = None  # (weakref to the input, its version, this forward's results)
        self.reset_yield_stats()
        if init == "random":  # the paper's choice; the global RNG is seeded identically on every rank
            with torch.no_grad():
                self.centres.normal_()
                self.initialised.fill_(True)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, clusters={self.n_clusters}, momentum={self.momentum:g}, metric={self.metric}, "
                f"init={self.init}, gamma={self.gamma:g}, calibrate={self.calibrate}, clip={self.clip}")

    # -- distance ---------------------------------------------------------------------------------------
    def std(self) -> torch.Tensor:
        return self.var.float().sqrt().clamp_min(self.min_std)

    @torch.no_grad()
    def ratios(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(idx, r, delta)`` of fp32 tokens ``x`` (T, C): nearest cluster, ``max_c |x - c_idx| / sigma_idx`` and
        ``delta = x - c_idx`` (for :meth:`observe`)."""
        c, v = self.centres.float(), self.var.float()
        idx = nearest(x, c, v, self.metric)
        g = c[idx]
        delta = torch.sub(x, g, out=g)  # x - c_idx, written over the gathered centres (one (T, C) buffer less)
        return idx, ratio_of(delta, idx, self.std()), delta

    def distance(self, r: torch.Tensor) -> torch.Tensor:
        """The yielding distance ``d`` from the ratio: ``r - 1`` (paper) or ``r / ratio - 1`` (calibrated)."""
        return (r / self.ratio.float().clamp_min(1e-6) if self.calibrate else r) - 1.0

    # -- training-time collection ---------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor, idx: torch.Tensor | None = None, r: torch.Tensor | None = None,
                delta: torch.Tensor | None = None, real: torch.Tensor | None = None) -> None:
        """Collect the tokens ``x`` (T, C) of a training forward (the candidate init before initialisation).

        ``idx``/``r``/``delta`` come from :meth:`ratios` (``delta`` is recomputed when not given); ``real`` (T,)
        bool marks the non-padding tokens (None: all real): only those are collected.
        """
        if not bool(self.initialised):
            x = x if real is None else x[real]
            if x.shape[0] and self.init == "data" and self._candidate is None:
                c, v = kmeans_init(x, self.n_clusters, self.init_iters, self.min_std)
                self._candidate = (c, v, max_ratio(x, nearest(x, c, v, self.metric), c,
                                                   v.sqrt().clamp_min(self.min_std)).mean())
            return
        vec = self.sums(x, idx, r, delta, real)
        self.add_pending(vec)

    @torch.no_grad()
    def sums(self, x: torch.Tensor, idx: torch.Tensor, r: torch.Tensor, delta: torch.Tensor | None = None,
             real: torch.Tensor | None = None) -> torch.Tensor:
        """This forward's flat per-cluster sums (see :meth:`observe`): ``(M * (2C + 1) + 2,)``."""
        m, cdim = self.n_clusters, self.dim
        if delta is None:
            delta = x - self.centres.float()[idx]
        # padding tokens go to a spare row m that is dropped: no (T, C) copies of the real tokens, and each
        # cluster still sums its tokens in token order, so the sums equal those of the compacted tokens
        slot = idx if real is None else torch.where(real, idx, m)
        zeros = lambda: torch.zeros(m + 1, cdim, device=x.device, dtype=torch.float32)  # noqa: E731
        sum_d = zeros().index_add_(0, slot, delta)
        sum_d2 = zeros().index_add_(0, slot, delta * delta)
        count = torch.bincount(slot, minlength=m + 1).to(torch.float32)
        sums = torch.cat([sum_d[:m], sum_d2[:m], count[:m, None]], dim=1)  # (M, 2C + 1)
        r = r if real is None else r[real]
        extra = torch.stack([r.sum(), torch.tensor(float(r.numel()), device=x.device)])
        return torch.cat([sums.flatten(), extra])

    def add_pending(self, vec: torch.Tensor) -> None:
        self._pending = vec if self._pending is None else self._pending + vec

    # -- reuse between linears that read the same input ----------------------------------------------------------
    def remember(self, x: torch.Tensor, results: tuple) -> None:
        """Keep this forward's results for the twins (weakly: a freed input can never match a new one)."""
        if self.twins:
            self._last = (weakref.ref(x), x._version, results)

    def from_twin(self, x: torch.Tensor) -> tuple | None:
        """The results a twin computed for this very input tensor, if its clustering state equals this one's.

        Linears that read the same tensor (a Llama MLP's gate_proj and up_proj) see the same tokens from the first
        step on, so with the data initialisation their clusters stay bitwise equal and the distance and cluster
        sums need computing once. The state is compared (M x C values: cheap next to the (T, C) passes saved),
        so reuse is exact whenever it happens, and a twin whose state differs simply computes its own.
        """
        for t in self.twins:
            last = t._last
            if last is not None and last[0]() is x and last[1] == x._version and self.same_state(t):
                return last[2]
        return None

    def same_state(self, other: SlidingClusters) -> bool:
        return (bool(self.initialised) and bool(other.initialised) and torch.equal(self.centres, other.centres)
                and torch.equal(self.var, other.var) and torch.equal(self.ratio, other.ratio))

    def pending(self) -> torch.Tensor:
        """This step's flat sums (zeros when this process saw no training token)."""
        if self._pending is not None:
            return self._pending
        return torch.zeros(self.n_clusters * (2 * self.dim + 1) + 2, device=self.centres.device)

    @torch.no_grad()
    def apply_sums(self, vec: torch.Tensor) -> None:
        """One EMA update from (all-reduced) flat sums; see the module docstring for the formulas."""
        m, cdim, mom = self.n_clusters, self.dim, self.momentum
        sums = vec[:-2].view(m, 2 * cdim + 1).float()
        n = sums[:, -1]
        hit = n > 0
        if bool(hit.any()):
            nn_ = n[hit, None]
            mean_d, mean_d2 = sums[hit, :cdim] / nn_, sums[hit, cdim:2 * cdim] / nn_
            spread = (mean_d2 - (2 * mom - mom * mom) * mean_d * mean_d).clamp_min(0.0)
            self.centres[hit] = self.centres[hit] + mom * mean_d
            self.var[hit] = ((1 - mom) * self.var[hit] + mom * spread).clamp_min(self.min_std**2)
        r_sum, r_n = vec[-2].float(), vec[-1].float()
        if float(r_n) > 0:
            self.ratio.copy_((1 - mom) * self.ratio + mom * r_sum / r_n)
        self._pending = None

    @torch.no_grad()
    def init_from(self, packed: torch.Tensor) -> bool:
        """Initialise from a packed candidate ``[flag, centres, var, ratio]``; False if the flag is 0."""
        self._candidate = None
        if float(packed[0]) == 0.0:
            return False
        m, cdim = self.n_clusters, self.dim
        self.centres.copy_(packed[1:1 + m * cdim].view(m, cdim))
        self.var.copy_(packed[1 + m * cdim:1 + 2 * m * cdim].view(m, cdim))
        self.ratio.copy_(packed[-1])
        self.initialised.fill_(True)
        return True

    def packed_candidate(self) -> torch.Tensor:
        size = 2 + 2 * self.n_clusters * self.dim
        if self._candidate is None:
            return torch.zeros(size, device=self.centres.device)
        c, v, r = self._candidate
        one = torch.ones(1, device=c.device)
        return torch.cat([one, c.flatten(), v.flatten(), r.reshape(1)]).to(self.centres.device)

    # -- diagnostics -------------------------------------------------------------------------------------------
    def reset_yield_stats(self) -> None:
        self._ystats = {"tokens": 0.0, "distance": 0.0, "far": 0.0, "score": 0.0}

    @torch.no_grad()
    def track(self, d: torch.Tensor, s: torch.Tensor) -> None:
        st = self._ystats
        st["tokens"] += d.numel()
        st["distance"] += float(d.double().sum())
        st["far"] += float((d > 0).double().sum())
        st["score"] += float(s.double().sum())

    def yield_stats(self) -> dict[str, float | int | None]:
        """Mean yielding distance ``d``, share of tokens with ``d > 0`` and mean score ``s`` since the reset."""
        st = self._ystats
        t = st["tokens"]
        if not t:
            return {"tokens": 0, "distance": None, "far_share": None, "score": None}
        return {"tokens": int(t), "distance": st["distance"] / t, "far_share": st["far"] / t, "score": st["score"] / t}


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def update_clusters(model: nn.Module) -> None:
    """Apply the collected statistics of every :class:`SlidingClusters` in ``model`` (call once per step).

    Under ``torch.distributed`` the per-cluster sums are all-reduced (summed; the counts are summed too, so the
    means are those of the pooled tokens -- the same as averaging sums and counts) in one collective, and a data
    initialisation is broadcast from rank 0, so every process holds identical clusters. Every process must call
    this at the same step, as the training loop's ``on_step`` does.
    """
    states = [m for m in model.modules() if isinstance(m, SlidingClusters)]
    if not states:
        return
    world = _dist_world()
    ready = [s for s in states if bool(s.initialised)]
    waiting = [s for s in states if not bool(s.initialised)]
    if ready:
        vecs = [s.pending() for s in ready]
        flat = torch.cat(vecs)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
        for s, part in zip(ready, flat.split([v.numel() for v in vecs])):
            s.apply_sums(part)
    if waiting:
        packs = [s.packed_candidate() for s in waiting]
        flat = torch.cat(packs)
        if world > 1:
            import torch.distributed as dist

            dist.broadcast(flat, src=0)
        for s, part in zip(waiting, flat.split([p.numel() for p in packs])):
            s.init_from(part)
