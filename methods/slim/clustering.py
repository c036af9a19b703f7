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
``|x - c| / sigma`` normalises -- rather than around their batch mean (the [D] of docs/methods.md §1.6), which
would ignore a lagging centre. Clusters that receive no token this step are left unchanged.

No host-device syncs in the forward and backward: every tensor-to-Python read (``bool``, ``float``, ``.item()``,
``torch.equal``) stalls the host until an accelerator catches up, so the forward branches only on Python-side
mirrors of the buffers (``ready``, the twins' lineage tokens), written where the buffers are written (the update
after the step, ``load_state_dict``, :meth:`SlidingClusters.refresh`), and the statistics stay device tensors until
a diagnostics call reads them. Sums over the real (non-padding) tokens compact them with a boolean index on the CPU,
where that waits for nothing and keeps the summation order of the published CPU results; on an accelerator they
are masked sums instead (:func:`real_sum`). Left: the initialising forward (once per linear, first step) compacts
the tokens for the k-means on every device, and the first update (and, in a multi-process run, every update)
reads a few flags -- both outside the steady-state forward.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch
from torch import nn

# lineage tokens: two states holding one token hold equal clusters (see SlidingClusters.lineage)
_TOKENS = itertools.count(1)
Seen = tuple[tuple[weakref.ref, int], ...]


def compacts(device: torch.device) -> bool:
    """Whether sums over the real tokens compact them with a boolean index on ``device``.

    On the CPU that waits for nothing and keeps the original summation order (bit-identical CPU results); on an
    accelerator a boolean index waits for the device to count the tokens, so masked sums are used there.
    """
    return device.type == "cpu"


def real_sum(v: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``v`` (T,) over the real tokens (``real`` (T,) bool; None: all), without a host sync."""
    if real is None:
        return v.sum()
    if compacts(v.device):
        return v[real].sum()
    return torch.where(real, v, 0).sum()


def seen(tensors: Sequence[torch.Tensor]) -> Seen:
    """Identity and version counter of each tensor: :func:`unchanged` tells, without reading a value, whether
    any of them was replaced or written in place since."""
    return tuple((weakref.ref(t), t._version) for t in tensors)


def unchanged(key: Seen, tensors: Sequence[torch.Tensor]) -> bool:
    return len(key) == len(tensors) and all(r() is t and v == t._version for (r, v), t in zip(key, tensors))


def _version(x: torch.Tensor) -> int | None:
    """``x``'s version counter, or None for an inference tensor (it has none: never reuse work for it)."""
    return None if x.is_inference() else x._version


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
    # counts by index_add_ and the update by torch.where: bincount and a boolean index both wait for the device
    ones = torch.ones(t, device=x.device, dtype=x.dtype)
    for _ in range(iters):
        idx = nearest(z, centres / gvar.sqrt(), torch.ones_like(centres), "euclidean")
        counts = torch.zeros(m, device=x.device, dtype=x.dtype).index_add_(0, idx, ones)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centres)
    idx = nearest(z, centres / gvar.sqrt(), torch.ones_like(centres), "euclidean")
    counts = torch.zeros(m, device=x.device, dtype=x.dtype).index_add_(0, idx, ones)
    sq = torch.zeros_like(centres).index_add_(0, idx, (x - centres[idx]) ** 2)
    var = torch.where(counts[:, None] >= 2, sq / counts.clamp_min(1)[:, None], gvar)
    return centres, var.clamp_min(min_std**2)


class SlidingClusters(nn.Module):
    """Clustering state of one adapted linear plus the weight-yielding settings that read it.

    Buffers (persistent, fp32, saved with the trainable state): ``centres`` (M, C), ``var`` (M, C), ``ratio``
    (running mean of ``max_c |x - c| / sigma`` over training tokens) and ``initialised``.

    The forward reads none of them into Python: it branches on :attr:`ready` (a mirror of ``initialised``) and on
    :meth:`lineage` (for the twin reuse), both kept where the buffers are written -- the update after the step,
    ``load_state_dict`` and :meth:`refresh`. A write from anywhere else is noticed through the buffers' version
    counters: it voids the lineage, and the flag is read again once.
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
        self._pending_tags: tuple[int, ...] = ()  # which forwards' sums ``_pending`` holds (see :meth:`lineage`)
        self._candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # data init, this rank
        # siblings that read the same input (gate_proj/up_proj): see :meth:`from_twin`; a plain list, so they are
        # not submodules and the state dict is unchanged
        self.twins: list[SlidingClusters] = []
        self._last: tuple | None = None  # (weakref to the input, its version, lineage, this forward's results)
        self._ready = False
        self._ready_seen: Seen = ()
        self._lineage: int | None = None
        self._lineage_seen: Seen = ()
        self.reset_yield_stats()
        if init == "random":  # the paper's choice; the global RNG is seeded identically on every rank
            with torch.no_grad():
                self.centres.normal_()
                self.initialised.fill_(True)
        self._set_ready(init == "random")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, clusters={self.n_clusters}, momentum={self.momentum:g}, metric={self.metric}, "
                f"init={self.init}, gamma={self.gamma:g}, calibrate={self.calibrate}, clip={self.clip}")

    # -- Python-side mirrors of the buffers ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the clusters are initialised: the Python mirror of ``initialised``, so no tensor is read."""
        if not unchanged(self._ready_seen, (self.initialised,)):
            # written from outside (by hand, or a loader that bypasses load_state_dict, whose hook refreshes the
            # mirror): read it once -- never the case in a training run
            self._set_ready(bool(self.initialised))
        return self._ready

    def _set_ready(self, flag: bool) -> None:
        self._ready = flag
        self._ready_seen = seen((self.initialised,))

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.initialised, self.centres, self.var, self.ratio

    def lineage(self) -> int | None:
        """Token of this state's clusters: states holding one token hold equal clusters (None: unknown).

        A token is handed out where twins were compared and found equal (after the initialisation, after loading
        a state, after a multi-process update) and carried through an update that provably gives equal bits (one
        process, equal states, the sums of the same forwards); any other write to the buffers voids it.
        """
        if self._lineage is None or not unchanged(self._lineage_seen, self._state()):
            return None
        return self._lineage

    def _set_lineage(self, token: int | None) -> None:
        self._lineage = token
        self._lineage_seen = () if token is None else seen(self._state())

    def refresh(self) -> None:
        """Re-read the mirrors from the buffers after a write from outside (reads tensors: not in a forward).

        Runs by itself after ``load_state_dict``; a twin loaded later finds this one equal in its own refresh.
        """
        self._set_ready(bool(self.initialised))
        self._set_lineage(None)
        for t in self.twins:
            if self.same_state(t):
                token = t.lineage()
                if token is None:
                    token = new_token()
                    t._set_lineage(token)
                self._set_lineage(token)
                break

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh()  # loading runs outside any forward: the loaded flag may be read here

    def __getstate__(self) -> dict:
        # weak references do not pickle: a copy re-reads its mirrors once and shares with no twin until compared
        state = self.__dict__.copy()
        state.update(_ready_seen=(), _lineage_seen=(), _last=None)
        return state

    def _apply(self, fn, recurse: bool = True):
        ready = self.ready
        out = super()._apply(fn, recurse)
        # a move or cast keeps the flag's value: follow the new tensor without reading it (the lineage of replaced
        # buffers is void, so twins compute their own until the next comparison)
        self._set_ready(ready)
        return out

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
        if not self.ready:
            if self.init != "data" or self._candidate is not None:
                return
            # the one compaction left in a forward, on an accelerator too: the k-means of the first batch's real
            # tokens, once per linear (a masked k-means would not reproduce the CPU results' bits)
            x = x if real is None else x[real]
            if x.shape[0]:
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
        zeros = lambda *s: torch.zeros(m + 1, *s, device=x.device, dtype=torch.float32)  # noqa: E731
        sum_d = zeros(cdim).index_add_(0, slot, delta)
        sum_d2 = zeros(cdim).index_add_(0, slot, delta * delta)
        # counted by index_add_ (exact integers in fp32): torch.bincount waits for the device to size its output
        count = zeros().index_add_(0, slot, torch.ones_like(r))
        sums = torch.cat([sum_d[:m], sum_d2[:m], count[:m, None]], dim=1)  # (M, 2C + 1)
        n = (torch.full((), float(r.numel()), device=x.device, dtype=torch.float32) if real is None
             else real.sum().to(torch.float32))
        extra = torch.stack([real_sum(r, real), n])
        return torch.cat([sums.flatten(), extra])

    def add_pending(self, vec: torch.Tensor, tag: int | None = None) -> None:
        """Add a forward's sums to this step's; ``tag`` names them (a twin that reuses them passes the same)."""
        self._pending = vec if self._pending is None else self._pending + vec
        self._pending_tags += (new_token() if tag is None else tag,)

    # -- reuse between linears that read the same input ----------------------------------------------------------
    def remember(self, x: torch.Tensor, results: tuple) -> None:
        """Keep this forward's results for the twins (weakly: a freed input can never match a new one)."""
        if self.twins:
            version = _version(x)
            self._last = None if version is None else (weakref.ref(x), version, self.lineage(), results)

    def from_twin(self, x: torch.Tensor) -> tuple | None:
        """The results a twin computed for this very input tensor under clusters equal to this one's.

        Linears that read the same tensor (a Llama MLP's gate_proj and up_proj) see the same tokens from the first
        step on, so with the data initialisation their clusters stay bitwise equal and the distance and cluster
        sums need computing once. Equality is known from the lineage tokens (Python values: nothing is read), so
        reuse is exact whenever it happens; a twin whose token differs or is unknown simply computes its own.
        """
        token, version = self.lineage(), _version(x)
        if token is None or version is None:
            return None
        for t in self.twins:
            last = t._last
            if last is not None and last[0]() is x and last[1] == version and last[2] == token:
                return last[3]
        return None

    def same_state(self, other: SlidingClusters) -> bool:
        """Whether both are initialised with equal clusters (reads tensors: for checks outside the forward)."""
        return (self.ready and other.ready and torch.equal(self.centres, other.centres)
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
        n = sums[:, -1:]
        hit = n > 0  # (M, 1)
        # every row is computed and torch.where keeps the clusters without tokens (their 0/0 is dropped): the hit
        # rows see the same elementwise operations as on their own, so the same bits, without a boolean index
        mean_d, mean_d2 = sums[:, :cdim] / n, sums[:, cdim:2 * cdim] / n
        spread = (mean_d2 - (2 * mom - mom * mom) * mean_d * mean_d).clamp_min(0.0)
        self.centres.copy_(torch.where(hit, self.centres + mom * mean_d, self.centres))
        self.var.copy_(torch.where(hit, ((1 - mom) * self.var + mom * spread).clamp_min(self.min_std**2), self.var))
        r_sum, r_n = vec[-2].float(), vec[-1].float()
        self.ratio.copy_(torch.where(r_n > 0, (1 - mom) * self.ratio + mom * r_sum / r_n, self.ratio))
        self._pending = None
        self._pending_tags = ()

    @torch.no_grad()
    def init_from(self, packed: torch.Tensor, flag: bool | None = None) -> bool:
        """Initialise from a packed candidate ``[flag, centres, var, ratio]``; False if the flag is 0.

        ``flag``: the packed flag when the caller knows it (else it is read from ``packed``).
        """
        self._candidate = None
        if flag is None:
            flag = float(packed[0]) != 0.0
        if not flag:
            return False
        m, cdim = self.n_clusters, self.dim
        self.centres.copy_(packed[1:1 + m * cdim].view(m, cdim))
        self.var.copy_(packed[1 + m * cdim:1 + 2 * m * cdim].view(m, cdim))
        self.ratio.copy_(packed[-1])
        self.initialised.fill_(True)
        self._set_ready(True)
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
        self._ystats: torch.Tensor | None = None  # device sums: tokens, distance, far (d > 0), score

    @torch.no_grad()
    def track(self, d: torch.Tensor, s: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Add the yielding statistics of a forward's real tokens (``real`` (T,) bool; None: all) on the device;
        :meth:`yield_stats` reads them."""
        sdt = torch.float32 if d.device.type == "mps" else torch.float64  # mps has no fp64
        if real is None or compacts(d.device):
            if real is not None:
                d, s = d[real], s[real]
            n = torch.full((), float(d.numel()), device=d.device, dtype=sdt)
            vals = torch.stack([n, d.to(sdt).sum(), (d > 0).to(sdt).sum(), s.to(sdt).sum()])
        else:
            vals = torch.stack([real.sum().to(sdt), torch.where(real, d, 0).to(sdt).sum(),
                                (real & (d > 0)).to(sdt).sum(), torch.where(real, s, 0).to(sdt).sum()])
        if self._ystats is None:
            self._ystats = torch.zeros(4, device=d.device, dtype=sdt)
        self._ystats.add_(vals)

    def yield_stats(self) -> dict[str, float | int | None]:
        """Mean yielding distance ``d``, share of tokens with ``d > 0`` and mean score ``s`` since the reset."""
        t, dist, far, score = (0.0, 0.0, 0.0, 0.0) if self._ystats is None else self._ystats.tolist()
        if not t:
            return {"tokens": 0, "distance": None, "far_share": None, "score": None}
        return {"tokens": int(t), "distance": dist / t, "far_share": far / t, "score": score / t}


def new_token() -> int:
    """A fresh lineage / pending-sums token."""
    return next(_TOKENS)


def relink(states: Sequence[SlidingClusters]) -> None:
    """Compare each of ``states`` with its twins and give every group of equal ones a fresh lineage token; the
    others in ``states`` lose theirs. One read for all comparisons (outside the forward)."""
    pairs, done = [], set()
    for a in states:
        for b in a.twins:
            key = frozenset((id(a), id(b)))
            if key not in done and a.ready and b.ready and a.centres.shape == b.centres.shape:
                done.add(key)
                pairs.append((a, b))
    for st in states:
        st._set_lineage(None)
    if not pairs:
        return
    dev = pairs[0][0].centres.device
    equal = torch.stack([((a.centres == b.centres).all() & (a.var == b.var).all() & (a.ratio == b.ratio)).to(dev)
                         for a, b in pairs]).tolist()
    group: dict[int, list[SlidingClusters]] = {}
    for (a, b), eq in zip(pairs, equal):
        if not eq:
            continue
        ga, gb = group.get(id(a), [a]), group.get(id(b), [b])
        if ga is not gb:
            ga.extend(gb)
            for st in ga:
                group[id(st)] = ga
    for members in {id(g): g for g in group.values()}.values():
        token = new_token()
        for st in members:
            st._set_lineage(token)


def refresh_states(states: Sequence[SlidingClusters]) -> None:
    """:meth:`SlidingClusters.refresh` for many states after their buffers were written in place (one read for
    the flags, one for the twin comparisons)."""
    if not states:
        return
    dev = states[0].initialised.device
    for st, flag in zip(states, torch.stack([st.initialised.to(dev) for st in states]).tolist()):
        st._set_ready(bool(flag))
    relink(states)


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

    In one process nothing is read back from the device (the twins' lineage follows from the update); the step
    that initialises reads the twin comparisons once, and a multi-process run reads them after every update
    (an all-reduce may sum two twins' equal parts in different orders) plus, while initialising, rank 0's flags.
    """
    states = [m for m in model.modules() if isinstance(m, SlidingClusters)]
    if not states:
        return
    world = _dist_world()
    ready = [s for s in states if s.ready]
    waiting = [s for s in states if not s.ready]
    if ready:
        vecs = [s.pending() for s in ready]
        before = [(s.lineage(), s._pending_tags) for s in ready]
        flat = torch.cat(vecs)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
        for s, part in zip(ready, flat.split([v.numel() for v in vecs])):
            s.apply_sums(part)
        if world > 1:
            relink(ready)
        else:  # equal clusters updated from the sums of the same forwards stay equal: same token, new value
            derived: dict[tuple, int] = {}
            for s, (token, tags) in zip(ready, before):
                if token is not None and (token, tags) not in derived:
                    derived[token, tags] = new_token()
                s._set_lineage(None if token is None else derived[token, tags])
    if waiting:
        packs = [s.packed_candidate() for s in waiting]
        flat = torch.cat(packs)
        if world > 1:
            import torch.distributed as dist

            dist.broadcast(flat, src=0)
            starts = [0]
            for p in packs[:-1]:
                starts.append(starts[-1] + p.numel())
            flags = [f != 0.0 for f in flat[starts].tolist()]  # rank 0's: read once per step until initialised
        else:
            flags = [s._candidate is not None for s in waiting]
        for s, part, flag in zip(waiting, flat.split([p.numel() for p in packs]), flags):
            s.init_from(part, flag)
        relink([s for s, flag in zip(waiting, flags) if flag])
