"""Experiment configuration: dataclasses validated on construction, YAML files and ``--set`` overrides.

Merge order: dataclass defaults -> ``--config FILE.yaml`` -> CLI flags -> ``--set key=value``. Every error is a
:class:`UserError` naming the field and the bad value (unknown keys get a did-you-mean).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import UserError
from benchmark.precision import PRECISIONS, check_precision
from benchmark.samples import check_log_samples
from benchmark.shard import parse_shard
from benchmark.sharding import SHARDINGS

TINY_WORLD = "tiny-world"
REFERENCES = ("joint",)  # upper-bound runs a plan can add (benchmark/reference.py)
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
SCHEDULERS = ("constant", "cosine", "linear")
KEEP_WEIGHTS = ("auto", "none", "final", "all")  # benchmark/weights.py
TRACKERS = ("tensorboard", "wandb", "mlflow")  # accelerate's trackers (benchmark/trackers.py)


def check_reference(name: str | None) -> None:
    """Validate a ``reference`` config value (None = no reference run)."""
    if name is not None and name not in REFERENCES:
        raise UserError(f"invalid reference: {name!r}; valid: {', '.join(REFERENCES)} (or leave it unset)")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(f"invalid {name}: {value!r} (must be a {'non-negative' if allow_zero else 'positive'} number)")


@dataclass
class PretrainConfig:
    """Recipe of the tiny-world base model (its hash is the cache key: change any field, get a new model)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 1024
    max_steps: int = 1200
    eval_every: int = 100
    target_accuracy: float = 97.0
    lr: float = 2e-3
    batch_size: int = 64
    warmup_steps: int = 100
    seed: int = 0
    # CPU matmul reductions depend on the thread count, so the base model would depend on the machine and on the
    # caller's num_threads (1 thread: 99.7 % general accuracy, 2 threads: 99.3 %); pinned, part of the cache key.
    num_threads: int = 1

    def __post_init__(self) -> None:
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_steps",
                  "eval_every", "lr", "batch_size", "num_threads"):
            _positive(f"model.pretrain.{k}", getattr(self, k))
        if self.hidden_size % self.num_heads:
            raise UserError(f"invalid model.pretrain.num_heads: {self.num_heads} does not divide {self.hidden_size}")


@dataclass
class ModelConfig:
    """Base model: ``tiny-world`` (built and cached locally) or a Hugging Face hub id / local path."""

    name: str = TINY_WORLD
    dtype: str = "auto"  # storage of the base weights; auto: as train.precision says (fp32 for fp32, else bf16)
    trust_remote_code: bool = False
    revision: str | None = None  # hub revision (branch, tag or commit) of a hub model
    chat_template: bool = False  # instruction models: wrap prompts in the tokenizer's chat template (train + eval)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"invalid model.dtype: {self.dtype!r}; valid: auto, float32, bfloat16, float16")


@dataclass
class TrainConfig:
    """Training loop settings shared by every method (a method may override ``lr``)."""

    lr: float = 1e-3
    # multiplies every method's learning rate (its own default or train.lr): moves the whole tuned set of rates
    # to another model scale at once, keeping their ratios and the methods' names (no per-method variants)
    lr_scale: float = 1.0
    batch_size: int = 64
    grad_accum: int = 1
    scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_seq_len: int = 128
    steps_scale: float = 1.0
    max_steps: int | None = None
    gradient_checkpointing: bool = False
    # auto: bf16-mixed on a GPU with bf16, fp32 otherwise (benchmark/precision.py); the same for every method
    precision: str = "auto"
    # none: every process holds the whole model (one process, or DDP); fsdp: FSDP2 (benchmark/sharding.py)
    sharding: str = "none"

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise UserError(f"invalid train.sharding: {self.sharding!r}; valid: {', '.join(SHARDINGS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"invalid train.precision: {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        for k in ("lr", "lr_scale", "batch_size", "grad_accum", "max_seq_len", "steps_scale"):
            _positive(f"train.{k}", getattr(self, k))
        for k in ("warmup_steps", "weight_decay", "grad_clip"):
            _positive(f"train.{k}", getattr(self, k), allow_zero=True)
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"invalid train.scheduler: {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")

    def method_lr(self, method_lr: float | None) -> float:
        """The learning rate a method trains with: its own ``lr`` (else ``train.lr``) times ``lr_scale``."""
        return (method_lr if method_lr is not None else self.lr) * self.lr_scale


def check_eval_batch_size(value: Any) -> None:
    """``eval.batch_size``: a positive integer or ``"auto"``."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"invalid eval.batch_size: {value!r} (must be a positive integer or 'auto')")


def check_eval_limit(value: Any) -> None:
    """``eval.limit``: a positive integer (examples per task) or a fraction strictly between 0 and 1."""
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1))
    if not ok:
        raise UserError(f"invalid eval.limit: {value!r} (must be a positive integer, examples per task, or a "
                        f"fraction between 0 and 1 of each task's examples)")


@dataclass
class EvalConfig:
    """Evaluation settings; the batch size is recorded because scores can depend on it."""

    batch_size: int | str = 64  # or "auto": lm-eval's largest batch that fits; the record keeps "auto"
    limit: int | float | None = None  # examples per task, or a fraction in (0, 1) of each task's examples
    # per-sample rows (benchmark/samples.py): local = the harness's own task specs, all = lm-eval's too, none;
    # never changes a score, so it is neither in the evaluation cache key nor in a run's result inputs
    log_samples: str = "local"

    def __post_init__(self) -> None:
        check_eval_batch_size(self.batch_size)
        if self.limit is not None:
            check_eval_limit(self.limit)
        check_log_samples(self.log_samples)


@dataclass
class ExperimentConfig:
    """Everything a run needs. ``method_options[name]`` feeds that method's own config dataclass."""

    methods: list[str] = field(default_factory=lambda: ["full_ft", "lora"])
    seeds: list[int] = field(default_factory=lambda: [0])
    sequence: str = TINY_WORLD
    output: str = "outputs"
    num_threads: int | None = None
    reference: str | None = None  # one of REFERENCES: also run that upper bound (benchmark/reference.py)
    general: str | None = None  # a named suite (tasks/suites) or a suite YAML file replacing the sequence's own
    shard: str | None = None  # "K/N": run only the K-th of N round-robin slices of the (method x seed) plan
    data_dir: str | None = None  # prepared datasets (python -m benchmark prepare); default $FORGETBENCH_DATA
    data_roots: dict[str, str] = field(default_factory=dict)  # local dataset folders, e.g. {trace: /data/TRACE}
    # which stages' trainable state outlives a finished run (benchmark/weights.py); auto: final, or none for a
    # method that trains every parameter. Changes no number: at the top level, outside the result inputs
    keep_weights: str = "auto"
    # experiment trackers every run logs its per-step losses and per-stage scores to; changes no number
    report_to: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise UserError("invalid methods: empty list")
        if not self.seeds:
            raise UserError("invalid seeds: empty list")
        for s in self.seeds:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise UserError(f"invalid seed: {s!r} (must be a non-negative integer)")
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        try:
            check_precision(self.train.precision, self.model.dtype)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        check_reference(self.reference)
        if self.keep_weights not in KEEP_WEIGHTS:
            raise UserError(f"invalid keep_weights: {self.keep_weights!r}; valid: {', '.join(KEEP_WEIGHTS)}")
        if self.shard is not None:
            parse_shard(self.shard)
        bad = [t for t in self.report_to if t not in TRACKERS]
        if bad:
            raise UserError(f"invalid report_to: {', '.join(map(repr, bad))}; valid: {', '.join(TRACKERS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building from dicts --------------------------------------------------------------------------------
def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against a simple annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(path, value, a)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"invalid {path}: {value!r} (expected a list)")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"invalid {path}: {value!r} (expected a mapping)")
        return value
    if tp is float:
        # YAML 1.1 reads "1e30" and "3e-4" (no dot) as strings: accept a plain numeric literal
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"invalid {path}: {value!r} (expected a number)")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise UserError(f"invalid {path}: {value!r} (expected {tp.__name__})")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build ``cls`` from a nested dict, rejecting unknown keys (with did-you-mean) and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"invalid {path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {path + close[0]!r}?)" if close else ""
            raise UserError(f"unknown config key {full!r}{hint}; valid keys: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, tp)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # e.g. a method config's __post_init__: say which section
        raise UserError(f"{path.rstrip('.')}: {exc}" if path else str(exc)) from exc


def _parse_value(text: str) -> Any:
    """``--set`` values: Python/YAML literals (numbers, true/false, null, lists); anything else is a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` assignment to a nested dict."""
    if "=" not in assignment:
        raise UserError(f"invalid --set {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"invalid --set key {key!r}")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"invalid --set {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = _parse_value(text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with ``safe_load``; a missing file or bad YAML is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}); a config is a YAML file") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"invalid YAML in {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"invalid config {str(p)!r}: top level must be a mapping")
    return data


def normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Accept ``methods`` as a list of names or as a mapping name -> options (then the keys are run)."""
    data = dict(data)
    methods = data.get("methods")
    if isinstance(methods, dict):
        opts = data.setdefault("method_options", {})
        for name, o in methods.items():
            opts.setdefault(name, {}).update(o or {})
        data["methods"] = list(methods)
    elif isinstance(methods, str):
        data["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    return data


def make_config(base: dict[str, Any] | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build a validated :class:`ExperimentConfig` from a dict (e.g. YAML + CLI flags) and ``--set`` strings."""
    data = normalise(base or {})
    for o in overrides or []:
        # ``methods.<name>.<field>=v`` sets a method option, not the list of methods to run
        if o.startswith("methods.") and o.count(".") >= 2:
            o = "method_options." + o[len("methods."):]
        apply_override(data, o)
    return build_dataclass(ExperimentConfig, normalise(data))
