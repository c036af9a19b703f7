"""SLIM hyper-parameters: every detail the paper leaves unstated is a field with a documented default."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.base import MethodConfig

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METRICS = ("mahalanobis", "euclidean")
INITS = ("data", "random")
MASK_PHASES = ("both", "train", "eval", "none")
EVAL_MASKS = ("fixed", "resample")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SlimConfig(MethodConfig):
    """SLIM (Han et al., NAACL 2025, https://aclanthology.org/2025.naacl-long.246/); see ``methods.slim``.

    Experts and routing:
        n_experts: LoRA experts per adapted linear (paper: 10 experts of which 2 identity -> 8).
        n_identity: identity (null, zero-delta) experts per adapted linear (paper: 2).
        top_k: experts selected per token, renormalised over the selection (paper: not stated; its equation
            example reads top-2).
        rank, alpha: LoRA rank of every expert and the alpha of the ``alpha / rank`` scaling.
        dropout: dropout on the experts' input.
        target_modules: module-name suffixes to adapt (paper: the MLP projections).
        attention: also adapt ``q/k/v/o_proj`` with SLIM layers (the paper's full model had attention LoRA; its
            ablation says dropping it reduces forgetting by 2.29 points).
    Sliding clustering and weight yielding:
        n_clusters: cluster centres per adapted linear.
        momentum: EMA rate ``m`` of the per-optimiser-step centre / variance update.
        cluster_init: ``data`` (k-means on the first training batch's real tokens, deterministic given the
            data order) or ``random`` (N(0, 1) centres, unit variances, as the paper says).
        init_iters: Lloyd iterations of the ``data`` initialisation.
        metric: how the nearest cluster is chosen: ``mahalanobis`` (diagonal) or ``euclidean``.
        min_std: lower clamp of the per-channel standard deviation.
        gamma: yielding strength: identity logits ``+ gamma * s``, LoRA logits ``- gamma * s``.
        calibrate: divide the paper's ratio ``max_c |x - c| / sigma`` by its running mean over training tokens
            before subtracting 1, so that a typical fine-tuning token sits at ``d = 0`` (see ``methods.slim``).
        yield_clip: upper clip of the yielding score ``s = clamp(d, 0, yield_clip)`` (``None``: no clip).
    Dynamic merging (row / column masks):
        mask_ratio: DARE drop ratio ``p`` of the entries of each expert's ``BA``; rows of B and columns of A are
            dropped independently with ``q = 1 - sqrt(1 - p)``.
        mask_rescale: multiply the kept delta by ``1 / (1 - p)`` (DARE; not stated by the paper).
        mask_phase: where the masks act: ``both``, ``train``, ``eval`` or ``none``.
        eval_mask: ``fixed`` (one mask per layer drawn from a seeded generator, identical on every evaluation
            forward: exactly repeatable) or ``resample`` (a fresh mask per forward from the global RNG).
        mask_seed: seed of the fixed evaluation masks (``None``: the run seed, ``torch.initial_seed()`` at wrap).
    Loss:
        l1_weight: weight of ``sum_layers sum_experts |B|_1/(r*C_out) + |A|_1/(r*C_in)``.
    """

    lr: float | None = field(default=3e-3, metadata=_h("Learning rate (tiny-world validation choice; None: train.lr)."))
    n_experts: int = field(default=8, metadata=_h("LoRA experts per adapted linear."))
    n_identity: int = field(default=2, metadata=_h("Identity (zero-delta) experts per adapted linear."))
    top_k: int = field(default=2, metadata=_h("Experts selected per token (renormalised)."))
    rank: int = field(default=4, metadata=_h("LoRA rank of every expert."))
    alpha: float = field(default=8.0, metadata=_h("LoRA alpha; scaling = alpha / rank."))
    dropout: float = field(default=0.0, metadata=_h("Dropout on the experts' input."))
    target_modules: list[str] = field(default_factory=lambda: list(MLP), metadata=_h("Module suffixes to adapt."))
    attention: bool = field(default=False, metadata=_h("Also adapt q/k/v/o_proj."))
    n_clusters: int = field(default=8, metadata=_h("Cluster centres per adapted linear."))
    momentum: float = field(default=0.05, metadata=_h("EMA rate of the cluster update (per optimiser step)."))
    cluster_init: str = field(default="data", metadata=_h("Cluster initialisation: data or random."))
    init_iters: int = field(default=10, metadata=_h("Lloyd iterations of the data initialisation."))
    metric: str = field(default="mahalanobis", metadata=_h("Nearest-cluster metric: mahalanobis or euclidean."))
    min_std: float = field(default=1e-4, metadata=_h("Lower clamp of the per-channel std."))
    gamma: float = field(default=1.0, metadata=_h("Weight-yielding strength."))
    calibrate: bool = field(default=True, metadata=_h("Normalise the distance by its running training mean."))
    yield_clip: float | None = field(default=5.0, metadata=_h("Upper clip of the yielding score (None: none)."))
    mask_ratio: float = field(default=0.1, metadata=_h("Dynamic-merging drop ratio p of BA entries."))
    mask_rescale: bool = field(default=True, metadata=_h("Rescale the kept delta by 1/(1-p) (DARE)."))
    mask_phase: str = field(default="both", metadata=_h("Masks in: both, train, eval or none."))
    eval_mask: str = field(default="fixed", metadata=_h("Evaluation masks: fixed (repeatable) or resample."))
    mask_seed: int | None = field(default=None, metadata=_h("Seed of the fixed evaluation masks (None: run seed)."))
    l1_weight: float = field(default=1e-4, metadata=_h("Weight of the L1 regularisation of the adapters."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_experts", "rank", "n_clusters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Invalid {name}: {v!r} (must be an integer >= 1)")
        for name in ("n_identity", "init_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Invalid {name}: {v!r} (must be an integer >= 0)")
        total = self.n_experts + self.n_identity
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= total:
            raise ValueError(f"Invalid top_k: {self.top_k!r} (must be an integer in [1, n_experts + n_identity = "
                             f"{total}])")
        if not self.alpha > 0:
            raise ValueError(f"Invalid alpha: {self.alpha!r} (must be > 0)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Invalid dropout: {self.dropout!r} (must be in [0, 1))")
        if not self.target_modules:
            raise ValueError("Invalid target_modules: empty list")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"Invalid momentum: {self.momentum!r} (must be in (0, 1])")
        for name, value, valid in (("cluster_init", self.cluster_init, INITS), ("metric", self.metric, METRICS),
                                   ("mask_phase", self.mask_phase, MASK_PHASES),
                                   ("eval_mask", self.eval_mask, EVAL_MASKS)):
            if value not in valid:
                raise ValueError(f"Invalid {name}: {value!r}; valid: {', '.join(valid)}")
        if not self.min_std > 0:
            raise ValueError(f"Invalid min_std: {self.min_std!r} (must be > 0)")
        if not self.gamma >= 0:
            raise ValueError(f"Invalid gamma: {self.gamma!r} (must be >= 0)")
        if self.yield_clip is not None and not self.yield_clip > 0:
            raise ValueError(f"Invalid yield_clip: {self.yield_clip!r} (must be > 0 or null)")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"Invalid mask_ratio: {self.mask_ratio!r} (must be in [0, 1))")
        if self.mask_seed is not None and (not isinstance(self.mask_seed, int) or self.mask_seed < 0):
            raise ValueError(f"Invalid mask_seed: {self.mask_seed!r} (must be a non-negative integer or null)")
        if not self.l1_weight >= 0:
            raise ValueError(f"Invalid l1_weight: {self.l1_weight!r} (must be >= 0)")

    @property
    def targets(self) -> list[str]:
        """``target_modules`` plus the attention projections when ``attention`` is set (order kept, no repeats)."""
        extra = ATTENTION if self.attention else []
        return list(dict.fromkeys(list(self.target_modules) + extra))
