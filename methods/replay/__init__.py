"""Experience replay: every training batch mixes in examples kept from earlier stages (or general text).

Rehearsal is the oldest defence against catastrophic forgetting (Ratcliff 1990; Robins 1995) and the baseline that
most often beats dedicated methods in continual-learning studies (Chaudhry et al., "On Tiny Episodic Memories in
Continual Learning", 2019). For LLMs TRACE (Wang et al., 2023) replays earlier tasks' data and reports it as the
strongest baseline; mixing general (pretraining-like) text into fine-tuning is the usual way to keep general ability.

* ``replay``: a reservoir buffer (Vitter's Algorithm R) over the training examples of every stage trained so far;
  from stage 2 on, ``fraction`` of every batch comes from it.
* ``replay_general``: the buffer is a uniform sample of the general suite's corpus (for tiny-world: the pretraining
  facts), screened by :mod:`tasks.corpus` so that no general evaluation question is ever replayed; it is mixed in
  from the first stage on.

Both train on top of ``full_ft`` (default) or ``lora`` (``base``), with that method's default lr.

| detail | paper says | our default | why |
|---|---|---|---|
| buffer | reservoir over the stream (Chaudhry et al.); TRACE replays a share of each earlier task | reservoir, 200 examples | uniform over all past examples whatever the stage sizes; 200 = 6 % of tiny-world's 3,100 training examples |
| mixing | one replay batch per new batch (Chaudhry et al.: equal sizes) | 25 % of every batch's rows | the stage keeps most of its gradient signal; the ratio holds inside every batch (not on average) |
| what is replayed | inputs and targets as trained | the encoded training examples themselves | the same tokens and loss mask the stage trained on |
| general variant | pretraining data mixed in (e.g. Ouyang et al. 2022, "PPO-ptx") | a sample of the suite's corpus minus its questions | replaying the test questions would be training on the test set |
| base | any learner | ``full_ft`` | the classic rehearsal setting; ``lora`` available |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import Mixture, StageData, TaskInfo, register_method
from methods.on_base import OnBase
from methods.replay.config import ReplayConfig, ReplayGeneralConfig

logger = logging.getLogger(__name__)
PREFIX = "replay."  # buffer tensors in trainable_state


@dataclass
class Row:
    """One buffered example (the attributes ``collate`` reads)."""

    input_ids: list[int]
    labels: list[int]


def reservoir_add(buffer: list[Any], seen: int, items: list[Any], size: int) -> int:
    """Algorithm R: offer ``items`` to ``buffer`` (at most ``size`` kept, each of the ``seen + len(items)`` offered
    so far with equal probability); draws from torch's global RNG. Returns the new count of items seen."""
    for item in items:
        seen += 1
        if len(buffer) < size:
            buffer.append(item)
        else:
            j = int(torch.randint(seen, (1,)))
            if j < size:
                buffer[j] = item
    return seen


def pack(rows: list[Row]) -> dict[str, torch.Tensor]:
    """The buffer as tensors for a checkpoint (padded with -1, lengths kept)."""
    width = max((len(r.input_ids) for r in rows), default=0)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    labels = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :len(r.labels)] = torch.tensor(r.labels, dtype=torch.long)
    lengths = torch.tensor([len(r.input_ids) for r in rows], dtype=torch.long)
    return {"ids": ids, "labels": labels, "lengths": lengths}


def unpack(t: dict[str, torch.Tensor]) -> list[Row]:
    """Inverse of :func:`pack`."""
    return [Row(t["ids"][i, :n].tolist(), t["labels"][i, :n].tolist()) for i, n in enumerate(t["lengths"].tolist())]


@register_method("replay")
class Replay(OnBase):
    """A base learner plus a buffer whose examples fill ``fraction`` of every batch."""

    config_cls = ReplayConfig
    shardable = True  # only mixes rows into batches; its base (full_ft or lora) is shardable (tests/test_fsdp.py)

    def __init__(self, config: ReplayConfig | None = None) -> None:
        super().__init__(config)
        self.buffer: list[Row] = []
        self.seen = 0
        self.stage_rows: list[Row] = []

    def uses_general_text(self) -> bool:
        return self.config.source == "general"

    def on_stage_data(self, model: nn.Module, task: TaskInfo, data: StageData) -> None:
        self.stage_rows = [Row(list(e.input_ids), list(e.labels)) for e in data.examples]
        if self.config.source == "general" and not self.buffer:
            texts = data.general()
            if not texts:  # validation refuses a suite without a corpus; an all-screened one ends here
                raise ValueError("replay source 'general': the general corpus is empty after screening")
            self.seen = reservoir_add(self.buffer, 0, [Row(list(e.input_ids), list(e.labels)) for e in texts],
                                      self.config.buffer_size)

    def batch_mixture(self) -> Mixture | None:
        return Mixture(list(self.buffer), self.config.fraction) if self.buffer else None

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        if self.config.source == "tasks":
            self.seen = reservoir_add(self.buffer, self.seen, self.stage_rows, self.config.buffer_size)
        self.stage_rows = []

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = self.base.trainable_state(model)
        state.update({PREFIX + k: v for k, v in pack(self.buffer).items()})
        state[PREFIX + "seen"] = torch.tensor([self.seen], dtype=torch.long)
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        self.base.load_trainable_state(model, {k: v for k, v in state.items() if not k.startswith(PREFIX)})
        self.buffer, self.seen = unpack(own), int(own["seen"][0])

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return {"buffer_size": len(self.buffer), "examples_seen": self.seen}


@register_method("replay_general")
class ReplayGeneral(Replay):
    """Replay of the general suite's screened corpus from the first stage on."""

    config_cls = ReplayGeneralConfig
