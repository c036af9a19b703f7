"""Configuration of experience replay (``replay`` and ``replay_general``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.on_base import OnBaseConfig

SOURCES = ("tasks", "general")


@dataclass
class ReplayConfig(OnBaseConfig):
    """Hyper-parameters of experience replay.

    Args:
        base: what trains: ``full_ft`` (every weight) or ``lora`` (the default ``lora`` adapter).
        source: ``tasks`` (a reservoir over the training examples of every earlier stage) or ``general`` (a uniform
            sample of the general suite's screened corpus, replayed from the first stage on).
        buffer_size: examples the buffer holds.
        fraction: share of each training batch drawn from the buffer (``benchmark.data.mixture_rows`` rounds it to
            whole rows: at least one, and at least one row of the stage's own data).
        lr: None = the base method's default lr (chosen on the tiny-world validation sequence for that method,
            not re-tuned for replay).
    """

    source: str = field(default="tasks", metadata={"help": "tasks (earlier stages) or general (general corpus)."})
    buffer_size: int = field(default=200, metadata={"help": "Examples kept in the replay buffer."})
    fraction: float = field(default=0.25, metadata={"help": "Share of every batch drawn from the buffer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in SOURCES:
            raise ValueError(f"Invalid source: {self.source!r} (valid: {', '.join(SOURCES)})")
        if not isinstance(self.buffer_size, int) or isinstance(self.buffer_size, bool) or self.buffer_size < 1:
            raise ValueError(f"Invalid buffer_size: {self.buffer_size!r} (must be an integer >= 1)")
        if not isinstance(self.fraction, (int, float)) or not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"Invalid fraction: {self.fraction!r} (must be in [0, 1))")


@dataclass
class ReplayGeneralConfig(ReplayConfig):
    """``replay`` with ``source="general"``: the usual defence against general-knowledge forgetting."""

    source: str = field(default="general", metadata={"help": "tasks (earlier stages) or general (general corpus)."})
