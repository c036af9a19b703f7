"""Sharded training (``train.sharding: fsdp``): torch's FSDP2 ``fully_shard`` over every process of the run.

Design:

- **What is sharded.** After the method has wrapped the base model (adapters injected, weights frozen) and a
  checkpoint, if any, has been loaded, every transformer block (the model's ``_no_split_modules`` classes) and
  then the root are ``fully_shard``-ed over one device mesh of all processes. Parameters, gradients and the
  optimiser state are split across the processes; a block's weights are gathered only while it runs (and
  freed after its forward: ``reshard_after_forward``). The model stays sharded for the whole run.
- **Training** is the plain loop of :mod:`benchmark.train`: each process takes its slice of every global
  batch, as with DDP; FSDP2 reduce-scatters (averages) the gradients.
- **Evaluation** runs on the sharded model: every process runs the same lm-eval requests in lockstep, so each
  forward gathers one block at a time and no process ever holds the whole model; rank 0 keeps the result
  (:func:`benchmark.scoring.cached_evaluation`). Generation sets transformers' FSDP flag, so ``generate``
  keeps all processes stepping together (``synced_gpus``).
- **Checkpoints and cache keys**: after every stage the full weights are gathered, one tensor at a time, into
  an unsharded CPU copy of the wrapped model that rank 0 keeps (:func:`gather_into`); the method's own
  ``trainable_state`` and ``diagnostics`` read that copy. The checkpoint format is the one of an unsharded run,
  so a sharded run resumes (loaded into the unsharded model, then sharded again) bit-identically on the CPU
  (tests/test_fsdp.py), with any number of processes.
- **The stage-0 (base) evaluation** shards a separate copy of the base model, built only when the evaluation
  cache has no entry for it; it is freed before training starts.

Memory: every process loads the base weights into host RAM once before sharding (and once more for a base
evaluation that is not cached); rank 0 keeps the unsharded CPU copy (the whole model in its training dtypes) in
host RAM for the whole run. On the GPUs each process holds 1/N of the parameters, gradients and AdamW state,
plus one or two gathered blocks at a time. Methods whose hooks need the full parameters (a frozen teacher, Fisher penalties,
adapters added mid-run) declare ``shardable = False`` and are refused before any work.

``accelerate launch`` with ``distributed_type: FSDP`` and ``fsdp_version: 2`` turns this on as well; accelerate
1.15 ignores an FSDP plugin on CPU (it falls back to DDP), so the harness calls ``fully_shard`` itself: the same
code path then runs on CPUs (gloo) and GPUs (NCCL).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from benchmark.errors import UserError

logger = logging.getLogger(__name__)
SHARDINGS = ("none", "fsdp")
# accelerate's FSDP options this module does not implement: refused instead of silently ignored
_UNSUPPORTED_FSDP_ENV = {"FSDP_OFFLOAD_PARAMS": "parameter offload",
                         "FSDP_ACTIVATION_CHECKPOINTING": "activation checkpointing (use train.gradient_checkpointing)",
                         "FSDP_CPU_RAM_EFFICIENT_LOADING": "CPU-RAM-efficient loading"}


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config; FSDP1 and options not implemented here are refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"accelerate config: fsdp_version {version} is not supported; valid: 2 (FSDP2, "
                        f"see examples/accelerate/fsdp.yaml)")
    for var, what in _UNSUPPORTED_FSDP_ENV.items():
        if os.environ.get(var, "false").lower() == "true":
            raise UserError(f"accelerate config: {var}=true ({what}) is not supported with forgetbench's FSDP; "
                            f"set it to false")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP" or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        raise UserError(f"accelerate config: fsdp_auto_wrap_policy {policy!r} / fsdp_transformer_layer_cls_to_wrap "
                        f"are not supported; valid: TRANSFORMER_BASED_WRAP without a class list (forgetbench shards "
                        f"the model's own block classes, _no_split_modules)")
    return True


def resolve_sharding(configured: str) -> str:
    """``train.sharding`` as the run will use it: ``fsdp`` when configured or when launched with an FSDP config."""
    if configured not in SHARDINGS:
        raise UserError(f"invalid train.sharding: {configured!r}; valid: {', '.join(SHARDINGS)}")
    return "fsdp" if configured == "fsdp" or launched_with_fsdp() else configured


def reshard_after_forward() -> bool:
    """accelerate's ``fsdp_reshard_after_forward`` (default true: free each block's full weights after use)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")


def _block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def _holder(model: nn.Module) -> nn.Module:
    """The innermost module whose subtree holds every parameter of ``model``.

    A wrapper (a peft model) only delegates to the transformers model inside, and a method may hand evaluation
    that inner model: sharding the embeddings and head on the inner module makes its own forward gather them.
    """
    node = model
    while not any(True for _ in node.parameters(recurse=False)):
        holders = [c for c in node.children() if any(True for _ in c.parameters())]
        if len(holders) != 1:
            break
        node = holders[0]
    return node


def _fully_shard() -> Any:
    """torch's ``fully_shard`` (public from torch 2.6 on), or a one-line error naming the installed torch."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise UserError(f"train.sharding=fsdp needs torch >= 2.6 (FSDP2); this is torch {torch.__version__}") from exc
    return fully_shard


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every transformer block, then the root, over all processes (in place; returns ``model``)."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()

    blocks = _block_classes(model)
    if not blocks:
        raise UserError(f"train.sharding=fsdp: {type(model).__name__} names no transformer block class "
                        f"(_no_split_modules), so there is nothing to shard block by block")
    if not torch.distributed.is_initialized():
        # one launched process: accelerate starts no process group for it, but FSDP needs one (validation has
        # checked that a launcher set the rendezvous variables: check_launch)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    reshard = reshard_after_forward()
    n = 0
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
            n += 1
    fully_shard(_holder(model), mesh=mesh, reshard_after_forward=reshard)
    for module in model.modules():
        if hasattr(module, "generate") and hasattr(module, "config"):
            # transformers' generate reads this flag to keep every process stepping until all have finished
            module._is_fsdp_managed_module = True
    local, full = shard_bytes(model)
    logger.info("sharded %d blocks (%s) and the root over %d processes: %.1f of %.1f MB of parameters here", n,
                ", ".join(sorted(blocks)), world, local / 2**20, full / 2**20)
    return model


def shard_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter bytes this process holds, bytes of the whole model's parameters)."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        full += p.numel() * p.element_size()
        local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return local, full


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) has been sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's switch for gradient accumulation: reduce-scatter gradients only on the last micro-batch."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(sync, recurse=False)


def gather_into(model: nn.Module, twin: nn.Module | None) -> None:
    """Load the sharded ``model``'s full weights into ``twin``, an unsharded CPU copy held by rank 0 only.

    A collective (every process calls it): torch's distributed-checkpoint helper gathers the state dict one
    tensor at a time into rank 0's CPU memory. The method's own ``trainable_state``, ``diagnostics`` and checkpoint
    format then work on ``twin`` exactly as in an unsharded run.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if twin is not None:
        twin.load_state_dict(state)


def check_launch(sharding: str) -> None:
    """Sharding needs a process group, i.e. a launcher (``torchrun``, ``accelerate launch``; one process is fine)."""
    if sharding != "fsdp":
        return
    _fully_shard()
    if "WORLD_SIZE" not in os.environ:
        raise UserError("train.sharding=fsdp needs a distributed launch: run under torchrun or accelerate launch "
                        "(e.g. accelerate launch --config_file examples/accelerate/fsdp.yaml -m benchmark run ...)")
