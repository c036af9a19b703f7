"""Configuration of online Elastic Weight Consolidation (``ewc``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.on_base import OnBaseConfig, finite_number


@dataclass
class EwcConfig(OnBaseConfig):
    """Hyper-parameters of online EWC (the table in the ``methods.ewc`` docstring says where each default is from).

    Args:
        base: what trains and is regularised: ``full_ft`` (every weight, classic EWC) or ``lora`` (the default
            ``lora`` adapter; the penalty then covers the LoRA parameters only).
        ewc_lambda: penalty weight lambda in ``(lambda / 2) * sum F (theta - theta*)^2``; its scale is tied to the
            Fisher's normalisation (``fisher.py``: the mean over examples of the squared gradient of each example's
            summed answer-token log-likelihood) and to the training loss (a mean over answer tokens).
        gamma: online decay of the Fisher carried over from earlier stages, ``F <- gamma * F + F_new``
            (Schwarz et al., 2018); 1 weighs every earlier stage alike.
        fisher_samples: training examples of a stage the Fisher is estimated from (all of them when the stage has
            fewer), taken evenly spaced over the stage's list, without drawing from any RNG.
        lr: None = the base method's default lr (chosen on the tiny-world validation sequence for that method,
            not re-tuned for EWC).
    """

    ewc_lambda: float = field(default=100.0, metadata={"help": "Penalty weight lambda (Fisher normalisation: "
                                                                   "methods/ewc/fisher.py)."})
    gamma: float = field(default=1.0, metadata={"help": "Online decay of the earlier stages' Fisher, in [0, 1]."})
    fisher_samples: int = field(default=200, metadata={"help": "Examples per stage the Fisher is estimated from."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not finite_number(self.ewc_lambda) or self.ewc_lambda < 0:
            raise ValueError(f"Invalid ewc_lambda: {self.ewc_lambda!r} (must be a finite number >= 0)")
        if not finite_number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {self.gamma!r} (must be in [0, 1])")
        if not isinstance(self.fisher_samples, int) or isinstance(self.fisher_samples, bool) \
                or self.fisher_samples < 1:
            raise ValueError(f"Invalid fisher_samples: {self.fisher_samples!r} (must be an integer >= 1)")
