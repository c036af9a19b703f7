"""One plain training loop for every method, driven by ``accelerate``; method behaviour comes only from hooks."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from benchmark.config import TrainConfig
from benchmark.data import Example, batches
from benchmark.distributed import wrap_for_training
from benchmark.precision import apply_policy, autocast, resolve_precision
from benchmark.sharding import is_sharded, set_gradient_sync

logger = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


CURVE_POINTS = 1000  # at most this many points per stage in a run record's loss curve


@dataclass
class StageStats:
    steps: int
    seconds: float
    final_loss: float
    mean_loss: float
    tokens: int
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss] (with the aux loss), downsampled
    aux_curve: list[list[float]] | None = None  # [step, method's aux loss]; None for a method without one


def downsample(values: list[float], max_points: int = CURVE_POINTS) -> list[list[float]]:
    """``[[step, value], ...]`` (steps from 1): every step when there are at most ``max_points``, else the mean
    of ``max_points`` consecutive, near-equal chunks, each at its last step (so the curve's area is kept)."""
    if len(values) <= max_points:
        return [[i + 1, v] for i, v in enumerate(values)]
    bounds = np.linspace(0, len(values), max_points + 1).round().astype(int)
    return [[int(hi), float(np.mean(values[lo:hi]))] for lo, hi in zip(bounds[:-1], bounds[1:])]


class _NoHooks:
    """Stand-in method with no hooks (plain language modelling)."""

    def forward_context(self, model: nn.Module, batch: dict) -> Any:
        return contextlib.nullcontext()

    def aux_loss(self, model: nn.Module) -> None:
        return None

    def on_step(self, model: nn.Module, step: int) -> None:
        return None

    def batch_mixture(self) -> None:
        return None


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (all must stop together, or the others hang in backward)."""
    ok = bool(torch.isfinite(loss))
    if world == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=loss.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    from transformers import get_scheduler  # deferred: transformers takes seconds to import

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=min(cfg.warmup_steps, steps), num_training_steps=steps)


def train_stage(
    model: nn.Module,
    method: Any,
    examples: list[Example],
    steps: int,
    cfg: TrainConfig,
    lr: float,
    generator: torch.Generator,
    pad_id: int,
    accelerator: Any,
    desc: str = "train",
    quiet: bool = False,
    check_every: int = 0,
    should_stop: Any = None,
    data_parallel: bool = True,
    step_offset: int = 0,
) -> StageStats:
    """Train ``steps`` optimiser steps on ``examples``; loss = LM loss + ``method.aux_loss``.

    Every batch mixes in the rows of ``method.batch_mixture()`` when the method has one (experience replay).
    In a multi-process run (``data_parallel`` and more than one process) the model is wrapped for the stage by
    ``accelerator.prepare_model`` (DDP) and each process takes its slice of every global batch, so the global
    batch and the data order are the same for any number of processes; method hooks get the unwrapped model.
    ``data_parallel=False`` trains this process alone on whole batches (e.g. rank 0 building the tiny-world base).
    The precision policy ``cfg.precision`` is applied here, for every method alike (:mod:`benchmark.precision`).
    ``method`` may be ``None`` (plain language modelling, e.g. pretraining); ``should_stop(step)`` is asked every
    ``check_every`` steps and ends the stage early when it says so.
    """
    method = method if method is not None else _NoHooks()
    world = accelerator.num_processes if data_parallel else 1
    rank = accelerator.process_index if world > 1 else 0
    micro = math.ceil(cfg.batch_size / cfg.grad_accum)
    sizes = [len(range(cfg.batch_size)[m * micro:(m + 1) * micro]) for m in range(cfg.grad_accum)]
    if world > 1 and min(sizes) < world:
        # every process must run the same number of forward/backward passes, or the gradient all-reduce hangs
        raise ValueError(f"train.batch_size={cfg.batch_size} with grad_accum={cfg.grad_accum} gives micro-batches "
                         f"of {min(sizes)} rows, fewer than the {world} processes; raise the batch size")
    policy = resolve_precision(cfg.precision, accelerator.device.type)
    apply_policy(model, policy)  # before the optimizer exists: its state takes the trainable parameters' dtype
    inner = model
    sharded = is_sharded(model)  # FSDP2: sharded once per run by the stage loop (benchmark/sharding.py)
    if world > 1 and not sharded:
        model = wrap_for_training(accelerator, model)  # wrap first: the optimizer must see the wrapped parameters
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the method left no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps)
    if not sharded:  # accelerate's FSDP2 prepare wants the model with the optimizer; the model is sharded already
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    model.train()
    t0, losses, aux_losses, tokens = time.perf_counter(), [], [], 0
    bar = tqdm(total=steps, desc=desc, leave=False, disable=quiet or not accelerator.is_main_process)
    mixture = method.batch_mixture()  # e.g. replayed rows: drawn inside every global batch, before rank slicing
    for step, batch in enumerate(batches(examples, cfg.batch_size, steps, generator, pad_id, mixture), start=1):
        step_loss, step_aux = 0.0, None
        for m in range(cfg.grad_accum):
            part = {k: v[m * micro:(m + 1) * micro][rank::world].to(accelerator.device) for k, v in batch.items()}
            if part["input_ids"].shape[0] == 0:
                continue
            # DDP averages gradients over processes: weighting by rows * world / batch gives the batch mean
            weight = part["input_ids"].shape[0] * world / batch["input_ids"].shape[0]
            # all-reduce once per optimiser step, not once per micro-batch
            last = m == cfg.grad_accum - 1
            if sharded:
                set_gradient_sync(model, last)
            sync = contextlib.nullcontext() if world == 1 or last or sharded else accelerator.no_sync(model)
            with sync, method.forward_context(inner, part):
                with autocast(policy, accelerator.device.type):
                    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                                labels=part["labels"])
                loss = out.loss.float()
                aux = method.aux_loss(inner)
                if aux is not None:
                    loss = loss + aux
                    step_aux = (step_aux or 0.0) + float(aux.detach()) * weight
                if not _all_finite(loss, world):
                    raise DivergenceError(f"non-finite loss {loss.item()} at step {step} of {desc}")
                accelerator.backward(loss * weight)
            step_loss += loss.item() * weight
            tokens += int(part["attention_mask"].sum())
        if cfg.grad_clip > 0:
            if sharded:  # torch's clipping takes the norm over every shard (DTensor gradients)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step(inner, step)
        if world > 1:  # each process summed its slice: the batch mean is the mean over processes
            step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean"))
            if step_aux is not None:
                step_aux = float(accelerator.reduce(torch.tensor(step_aux, device=accelerator.device), "mean"))
        losses.append(step_loss)
        if step_aux is not None:
            aux_losses.append(step_aux)
        if accelerator.trackers:  # --report-to: every step, on one step axis across the run's stages
            logged = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]}
            if step_aux is not None:
                logged["train/aux_loss"] = step_aux
            accelerator.log(logged, step=step_offset + step)
        bar.update(1)
        if step % 10 == 0 or step == steps:
            bar.set_postfix(loss=f"{step_loss:.3f}")
        if check_every and should_stop is not None and step % check_every == 0 and should_stop(step):
            break
    bar.close()
    del model, optimizer, scheduler
    accelerator.free_memory()  # drop this stage's DDP wrapper and optimizer state before the next stage
    return StageStats(steps=len(losses), seconds=time.perf_counter() - t0, final_loss=losses[-1],
                      mean_loss=sum(losses) / len(losses), tokens=tokens, loss_curve=downsample(losses),
                      aux_curve=downsample(aux_losses) if len(aux_losses) == len(losses) else None)
