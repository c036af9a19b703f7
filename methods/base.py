"""The method plugin contract: a validated dataclass config and a class with a few optional hooks.

A method is registered by name with :func:`register_method`; the runner reaches it only through the
registry and never branches on its name. Outside packages register through the entry-point group
``forgetbench.methods`` (``name = "pkg.module:MyMethod"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from benchmark.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", group="forgetbench.methods", builtin_package="methods")


def register_method(name: str):
    """Class decorator: ``@register_method("lora")`` registers a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return deco


@dataclass
class TaskInfo:
    """What a method may know about the task of the current stage."""

    name: str
    kind: str  # "knowledge" or "skill"
    stage: int  # 1-based stage index in the sequence
    num_stages: int


@dataclass
class StageData:
    """The training data of the stage about to train, for methods that keep or use data (replay, EWC).

    Args:
        examples: the stage's encoded training examples, in file order (objects with ``input_ids`` and
            ``labels`` lists of ints; ``-100`` labels are masked out of the loss).
        general: returns encoded general text, for methods that replay it: the general suite's ``corpus`` with
            every text that holds a general evaluation question removed, encoded as plain language modelling
            (empty when the suite has no corpus). Called on demand: encoding it costs time.
        collate: pads a list of such examples into a CPU batch ``{input_ids, attention_mask, labels}``, exactly as
            the training loop batches them.
    """

    examples: list[Any]
    general: Callable[[], list[Any]]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]


@dataclass
class Mixture:
    """Rows of every training batch drawn from a method's own pool (experience replay).

    Each batch takes ``fraction`` of its rows (rounded to whole rows by the training loop, which knows the batch
    size) from ``pool``, drawn epoch by epoch from a seeded permutation like the stage's own rows, and the rest from
    the stage, so the ratio holds within every batch, not only on average.
    """

    pool: list[Any]
    fraction: float


@dataclass
class MethodConfig:
    """Base for method hyper-parameters; subclasses add documented fields and validate them.

    Args:
        lr: learning rate for this method; ``None`` uses ``train.lr`` of the experiment config.
    """

    lr: float | None = field(default=None, metadata={"help": "Learning rate override (None: train.lr)."})

    def __post_init__(self) -> None:
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Invalid lr: {self.lr!r} (must be a positive number or null)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_options(config_cls: type[MethodConfig]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every option of a method config dataclass, in declaration order.

    The help text is the field's ``metadata["help"]`` (empty when a field has none).
    """
    rows = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        # annotations are strings under `from __future__ import annotations`: exactly what the source says
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, kind, default, str(f.metadata.get("help", ""))))
    return rows


class Method(ABC):
    """Base class of every fine-tuning method. Only :meth:`wrap` is required."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    # whether the method runs under train.sharding=fsdp (benchmark/sharding.py): its hooks never need a whole
    # parameter outside a block's forward, and it adds no parameter after wrap. Off unless a test shows it works.
    shardable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Inject adapters, freeze what the method freezes, and return the model to train."""

    # -- optional hooks -----------------------------------------------------------------------------
    def validate(self, module_names: set[str]) -> None:
        """Check the config against the base model before any work; raise ``ValueError`` naming the bad value.

        ``module_names`` are the dotted names of every module of the base model (``model.named_modules()``),
        read from a model built on the ``meta`` device, so no weights are loaded.
        """

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        """Called before training on a task."""

    def on_stage_data(self, model: nn.Module, task: TaskInfo, data: StageData) -> None:
        """Called after :meth:`on_task_start` with the stage's training data, before training."""

    def uses_general_text(self) -> bool:
        """Whether the method reads :attr:`StageData.general` (validation then requires a suite with a corpus)."""
        return False

    def batch_mixture(self) -> Mixture | None:
        """Rows the training loop mixes into every batch of the coming stage (asked once per stage), or None."""
        return None

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        """Called after training on a task, before it is evaluated."""

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Context around each training forward pass; side information (the ``attention_mask``, task types a
        method derives from its :class:`TaskInfo`) reaches layers through it without changing ``transformers``'
        signatures."""
        yield

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        """Extra loss terms of the latest forward pass (e.g. a balancing loss), or ``None``."""
        return None

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to restore the method (default: trainable params + buffers it owns).

        Saved as safetensors after every stage. To resume, the runner wraps a fresh base model with
        :meth:`wrap` and calls :meth:`load_trainable_state`: whatever a method carries from one stage to the
        next (adapters, buffers, weights it changed in ``on_task_end``) must be in this dict. The evaluation
        cache also keys a stage's scores by it.
        """
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state`."""
        missing = set(state) - {n for n, _ in model.named_parameters()} - {n for n, _ in model.named_buffers()}
        if missing:
            raise KeyError(f"checkpoint keys not in model: {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific diagnostics for the run record (e.g. routing statistics)."""
        return {}

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """``trainable`` parameters and ``active`` ones (used per token; equal unless the method is sparse)."""
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable": n, "active": n}

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The module handed to evaluation (must behave like a ``transformers`` causal LM)."""
        return model

    def adapted_modules(self, model: nn.Module) -> list[str]:
        """Sorted module-name suffixes that carry trainable parameters, e.g. ``["down_proj", "up_proj"]``, or
        ``["all"]`` when every parameter trains (the leaderboard's budget columns). Default:
        :func:`adapted_module_names` of the wrapped model; override only if that reads the structure wrongly."""
        return adapted_module_names(model)


def check_targets(targets: list[str], module_names: set[str]) -> None:
    """Raise ``ValueError`` unless every target matches a whole trailing component of some module name
    (the matching rule of ``peft`` and of ``methods.moe_lora.inject_moe_lora``)."""
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        present = sorted({n.rsplit(".", 1)[-1] for n in module_names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"Invalid target_modules: {missing} not in the model; module names: {present}")


def adapted_module_names(model: nn.Module) -> list[str]:
    """Sorted last name components of the modules whose weights a wrapped model trains (``["all"]``: every one).

    A trainable parameter is credited to the adapter wrapper around it when there is one -- the innermost
    enclosing module that holds frozen weights, provided they are its own or its direct children's (peft's
    ``base_layer``, ``MoELoRALinear.base``) and its trainable ones lie at most two levels below it
    (``lora_A.default.weight``) -- and otherwise to the module that owns it (e.g. a norm trained in place).
    """
    params = list(model.named_parameters())
    if params and all(p.requires_grad for _, p in params):
        return ["all"]
    # deepest parameter (dots in its name relative to the module) of each kind under every module; -1 = none
    depth: dict[str, dict[bool, int]] = {}
    for name, p in params:
        parts = name.split(".")
        for i in range(len(parts)):
            d = depth.setdefault(".".join(parts[:i]), {True: -1, False: -1})
            d[p.requires_grad] = max(d[p.requires_grad], len(parts) - 1 - i)
    found: set[str] = set()
    for name, p in params:
        if not p.requires_grad:
            continue
        parts = name.split(".")
        chosen = parts[:-1]  # the owning module
        for i in range(len(parts) - 1, -1, -1):
            d = depth[".".join(parts[:i])]
            if d[False] >= 0:  # the innermost ancestor holding frozen weights: a wrapper, or the model itself
                if d[False] <= 1 and d[True] <= 2:
                    chosen = parts[:i]
                break
        names = [c for c in chosen if not c.isdigit()]
        found.add(names[-1] if names else parts[-1])
    return sorted(found)


def freeze(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
