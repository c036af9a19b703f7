"""LwF: the distillation term by hand, lambda = 0 is plain training bit for bit, a huge lambda holds the outputs at
the teacher's, and the LoRA teacher is a frozen adapter on the one base the student uses."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from benchmark.config import TrainConfig
from benchmark.data import Example
from benchmark.train import train_stage
from methods import METHODS, TaskInfo
from methods.lwf import TEACHER, Lwf, LwfConfig
from methods.lwf.distill import distill_loss
from tests.conftest import make_tiny_llama


def _examples(n: int = 16, vocab: int = 100) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (6 + i % 3,), generator=g).tolist()
        out.append(Example(ids, [-100] * 3 + ids[3:]))
    return out


PROBE = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])


def _probe_logits(method, model) -> torch.Tensor:
    m = method.eval_model(model)
    was = m.training
    m.eval()
    with torch.no_grad():
        out = m(input_ids=PROBE).logits.float()
    m.train(was)
    return out


def _stage(method, model, stage: int, steps: int, lr: float) -> None:
    """One stage as the stage loop runs it: hooks around ``train_stage``."""
    info = TaskInfo(name=f"t{stage}", kind="skill", stage=stage, num_stages=2)
    method.on_task_start(model, info)
    train_stage(model, method, _examples(), steps, TrainConfig(batch_size=4), lr,
                torch.Generator().manual_seed(stage), 0, Accelerator(cpu=True), quiet=True)
    method.on_task_end(model, info)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax p || softmax q)."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_distill_loss_by_hand():
    # one real position with vocabulary 2, one padded position that must not count
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    t = 2.0
    p = torch.softmax(teacher[0, 0] / t, -1)  # student at T is uniform
    want = t * t * float((p * (p.log() - math.log(0.5))).sum())
    assert distill_loss(student, teacher, mask, t).item() == pytest.approx(want, rel=1e-6)
    assert distill_loss(teacher, teacher, torch.ones(1, 2), t).item() == pytest.approx(0.0, abs=1e-7)
    s = student.clone().requires_grad_(True)
    te = teacher.clone().requires_grad_(True)
    distill_loss(s, te, mask, t).backward()
    assert te.grad is None or not te.grad.any()  # the teacher side carries no gradient
    assert not s.grad[0, 1].any()  # the padded position gets none either


@pytest.mark.parametrize("base", ["full_ft", "lora"])
def test_lambda_zero_is_plain_training_bit_for_bit(base):
    plain = METHODS.get(base)()
    lwf = Lwf(LwfConfig(base=base, lwf_lambda=0.0))
    a, b = plain.wrap(make_tiny_llama()), lwf.wrap(make_tiny_llama())
    for stage in (1, 2):
        torch.manual_seed(stage)
        _stage(plain, a, stage, steps=4, lr=1e-2)
        torch.manual_seed(stage)
        _stage(lwf, b, stage, steps=4, lr=1e-2)
    sa, sb = plain.trainable_state(a), lwf.trainable_state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_huge_lambda_keeps_the_outputs_at_the_teacher():
    results = {}
    for lam in (0.0, 1e4):
        method = Lwf(LwfConfig(base="full_ft", lwf_lambda=lam))
        model = method.wrap(make_tiny_llama())
        torch.manual_seed(0)
        _stage(method, model, 1, steps=5, lr=1e-2)
        teacher = _probe_logits(method, model)
        _stage(method, model, 2, steps=20, lr=1e-2)
        results[lam] = _kl(teacher, _probe_logits(method, model))
    assert results[0.0] > 1e-2  # plain training moves the outputs away from the stage-start model ...
    assert results[1e4] < results[0.0] / 20  # ... distillation at a huge weight holds them there


def test_lora_teacher_is_a_frozen_adapter_on_the_one_base(tiny_llama):
    method = Lwf(LwfConfig(base="lora"))
    model = method.wrap(tiny_llama)
    torch.manual_seed(0)
    _stage(method, model, 1, steps=3, lr=1e-2)
    base_storage = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    before = _probe_logits(method, model)
    method.on_task_start(model, TaskInfo(name="t2", kind="skill", stage=2, num_stages=2))
    params = dict(model.named_parameters())
    teacher = {n: p for n, p in params.items() if TEACHER in n.split(".")}
    assert teacher and not any(p.requires_grad for p in teacher.values())
    for n, p in teacher.items():  # a copy of the trained adapter, not the same tensor
        src = params[n.replace(TEACHER, "default")]
        assert torch.equal(p, src) and p.data_ptr() != src.data_ptr() and src.requires_grad
    assert {p.data_ptr() for n, p in params.items() if "lora_" not in n} == base_storage  # no second base
    assert not any(TEACHER in k for k in method.trainable_state(model))
    assert method.param_counts(model)["trainable"] == sum(p.numel() for n, p in params.items()
                                                         if p.requires_grad)
    assert torch.equal(_probe_logits(method, model), before)  # the student still answers with its own adapter
    method.on_task_end(model, TaskInfo(name="t2", kind="skill", stage=2, num_stages=2))
    assert not any(TEACHER in n for n, _ in model.named_parameters())  # the teacher is gone after the stage


def test_config_validates():
    assert LwfConfig().lwf_lambda == 1.0 and LwfConfig().temperature == 2.0
    for bad in ({"base": "mlp"}, {"lwf_lambda": -1.0}, {"temperature": 0.0}, {"lwf_lambda": float("inf")}):
        with pytest.raises(ValueError, match="Invalid"):
            LwfConfig(**bad)
