"""HiLo hyper-parameters (see :mod:`methods.hilo` for what the paper states and what is our default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.base import MethodConfig
from methods.hilo.allocation import ALPHA_HILL, FIXUPS, WINDOWS, parse_schedule

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Spec = str | int | list[int]


@dataclass
class HiloConfig(MethodConfig):
    """Per-layer expert counts and ranks, routing and the AlphaLoRA allocation.

    Args:
        experts: expert count per decoder layer: ``"2468"`` (MoLA: four contiguous layer groups with 2/4/6/8
            experts), ``"2-4-6-8"``, ``"uniform8"``, ``"alpha_hill"`` (AlphaLoRA, computed on the frozen
            weights) or a per-layer list; grammar in :mod:`methods.hilo.allocation`.
        ranks: LoRA rank per decoder layer (shared by the layer's experts), same forms except ``alpha_hill``:
            ``"2468"`` (HiLo's best configuration), ``"uniform5"``, ``[r_0, ..., r_{L-1}]``.
        top_k: experts selected per token (renormalised top-k); a layer with fewer experts uses all of them,
            so a one-expert layer has ``k = 1`` (AlphaLoRA's rule).
        alpha: LoRA alpha; each expert's delta is scaled by ``alpha / r_l`` (MoLA).
        dropout: dropout on the experts' input (the router sees the clean input).
        target_modules: module-name suffixes to adapt; they must sit in numbered decoder layers.
        balance_coef: coefficient of the Switch load-balancing loss (0 = off).
        n_null: AdaMoE-style null experts per layer (0 = plain top-k; see :mod:`methods.hilo`).
        null_top_k: experts selected per token when ``n_null > 0`` (None: ``2 * k_l``, AdaMoE's top-2 -> top-4).
        alpha_hill_total: total experts ``T`` of the AlphaLoRA allocation (None: ``5 * L``, i.e. 160 for 32 layers).
        alpha_hill_beta: exponent ``beta`` of the AlphaLoRA allocation.
        alpha_hill_window: cutoff window of the Hill fit: ``alphalora`` (code as written), ``peak``, ``none``.
        alpha_hill_fixup: integer fix-up: ``largest_remainder`` (monotone in the score) or ``alphalora``
            (the code as written, which is not).
        lr: 1e-3, chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``: the lr of the grid with the best validation plasticity; results/tuning/README.md), from {1e-3, 3e-3, 1e-2}.
    """

    lr: float | None = field(default=1e-3, metadata={"help": "Learning rate (tiny-world validation choice)."})

    experts: Spec = field(default="2468", metadata={"help": "Experts per layer: '2468', 'uniform8', "
                                                             "'alpha_hill' or a per-layer list."})
    ranks: Spec = field(default="2468", metadata={"help": "Rank per layer: '2468', 'uniform5' or a per-layer list."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (min with the layer's expert count)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / r_l."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the experts' input."})
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR),
                                      metadata={"help": "Module-name suffixes to adapt."})
    balance_coef: float = field(default=1e-3, metadata={"help": "Switch load-balancing loss coefficient (0: off)."})
    n_null: int = field(default=0, metadata={"help": "AdaMoE null experts per layer (0: off)."})
    null_top_k: int | None = field(default=None, metadata={"help": "top-k with null experts (None: 2 * k_l)."})
    alpha_hill_total: int | None = field(default=None, metadata={"help": "AlphaLoRA total experts T "
                                                                          "(None: 5 per layer)."})
    alpha_hill_beta: float = field(default=2.5, metadata={"help": "AlphaLoRA exponent beta."})
    alpha_hill_window: str = field(default="alphalora", metadata={"help": "Hill cutoff window: alphalora, "
                                                                           "peak, none."})
    alpha_hill_fixup: str = field(default="largest_remainder", metadata={"help": "Integer fix-up: "
                                                                                  "largest_remainder, alphalora."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("experts", "ranks"):  # ``--set methods.hilo.ranks=2468`` parses as a number: same schedule
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, str(value))
        parse_schedule(self.experts, "experts", allow_alpha_hill=True)
        parse_schedule(self.ranks, "ranks")
        for name in ("top_k", "n_null", "null_top_k", "alpha_hill_total"):
            value = getattr(self, name)
            low = 0 if name == "n_null" else 1
            if value is None and name in ("null_top_k", "alpha_hill_total"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"Invalid alpha: {self.alpha!r} (must be > 0)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"Invalid dropout: {self.dropout!r} (must be in [0, 1))")
        if not (isinstance(self.balance_coef, (int, float)) and self.balance_coef >= 0):
            raise ValueError(f"Invalid balance_coef: {self.balance_coef!r} (must be >= 0)")
        if not (isinstance(self.alpha_hill_beta, (int, float)) and self.alpha_hill_beta >= 0):
            raise ValueError(f"Invalid alpha_hill_beta: {self.alpha_hill_beta!r} (must be >= 0)")
        if self.alpha_hill_window not in WINDOWS:
            raise ValueError(f"Invalid alpha_hill_window: {self.alpha_hill_window!r}; valid: {', '.join(WINDOWS)}")
        if self.alpha_hill_fixup not in FIXUPS:
            raise ValueError(f"Invalid alpha_hill_fixup: {self.alpha_hill_fixup!r}; valid: {', '.join(FIXUPS)}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"Invalid target_modules: {self.target_modules!r} (a non-empty list of names)")

    @property
    def uses_alpha_hill(self) -> bool:
        return parse_schedule(self.experts, "experts", allow_alpha_hill=True).kind == ALPHA_HILL
