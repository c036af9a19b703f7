"""One precision policy for every registered method, applied by the trainer (benchmark/precision.py).

A bf16 base on the CPU stands in for a GPU run: under ``bf16-mixed`` every trainable parameter of every method
must be fp32 and the forward must run in bf16; under ``bf16`` the trainable parameters must be bf16. A method
whose adapters followed the base dtype, or kept a dtype of its own choosing, fails here.
"""

from __future__ import annotations

import pytest
import torch

from benchmark.errors import UserError


def _tiny_bf16_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _examples(n: int = 8):
    from benchmark.data import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(2, 64, (6 + i % 3,), generator=g).tolist()
        out.append(Example(ids, [-100] * 3 + ids[3:]))
    return out


def _train(method_name: str, precision: str):
    from accelerate import Accelerator

    from benchmark.config import TrainConfig
    from benchmark.train import train_stage
    from methods import METHODS
    from methods.base import TaskInfo

    model = _tiny_bf16_model()
    method = METHODS.get(method_name)()
    model = method.wrap(model)
    method.on_task_start(model, TaskInfo(name="t", kind="skill", stage=1, num_stages=1))
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    cfg = TrainConfig(batch_size=4, precision=precision)
    train_stage(model, method, _examples(), 2, cfg, 1e-3, torch.Generator().manual_seed(0), 0, Accelerator(cpu=True),
                quiet=True)
    handle.remove()
    return model, seen


def _method_names():
    from methods import METHODS

    return METHODS.names()


@pytest.mark.parametrize("method_name", _method_names())
def test_bf16_mixed_trains_fp32_parameters_under_bf16_autocast(method_name):
    model, seen = _train(method_name, "bf16-mixed")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen <= {torch.bfloat16}  # the frozen base stays stored in bf16
    assert seen and set(seen) == {torch.bfloat16}  # the forward ran under bf16 autocast


@pytest.mark.parametrize("method_name", _method_names())
def test_pure_bf16_is_applied_to_every_method_too(method_name):
    model, seen = _train(method_name, "bf16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert set(seen) == {torch.bfloat16}


def test_fp32_policy_changes_nothing_on_an_fp32_model():
    from benchmark.precision import apply_policy, autocast

    model = _tiny_bf16_model().float()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert apply_policy(model, "fp32") == 0
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_apply_policy_keeps_tied_weights_tied():
    from benchmark.precision import apply_policy

    model = _tiny_bf16_model()
    for p in model.parameters():
        p.requires_grad_(True)
    apply_policy(model, "bf16-mixed")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_auto_resolves_to_fp32_on_cpu_and_policy_sets_the_load_dtype():
    from benchmark.precision import load_dtype, resolve_precision

    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert load_dtype("fp32") == torch.float32 and load_dtype("bf16-mixed") == torch.bfloat16
    assert load_dtype("bf16-mixed", "float32") == torch.float32


@pytest.mark.parametrize("precision,dtype", [("fp32", "bfloat16"), ("bf16", "float32"), ("fp16", "auto")])
def test_contradicting_or_unknown_precision_is_a_user_error(precision, dtype):
    from benchmark.config import make_config

    with pytest.raises(UserError) as err:
        make_config({}, [f"train.precision={precision}", f"model.dtype={dtype}"])
    assert precision in str(err.value) and "valid" in str(err.value)


@pytest.mark.slow
def test_a_bf16_mixed_run_records_its_policy_and_caches_apart(tmp_path, cache_dir, capsys):
    """End to end on the CPU: the record names the policy, a finished fp32 run is not taken for a bf16-mixed
    one, and the evaluation cache keys the policy (the same fp32-stored base is evaluated again under autocast)."""
    import json

    from benchmark.cli import main
    from tests.conftest import TINY_RUN

    sets = [a for s in TINY_RUN for a in ("--set", s)]
    out = tmp_path / "out"
    assert main(["-q", "run", "--methods", "lora", "--output", str(out), *sets]) == 0
    fp32 = json.loads(next((out / "runs").glob("*.json")).read_text())
    mixed_args = ["-q", "run", "--methods", "lora", "--output", str(out), *sets, "--set", "train.precision=bf16-mixed",
                  "--set", "model.dtype=float32"]
    assert main(mixed_args) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert main([*mixed_args, "--force"]) == 0
    mixed = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert fp32["precision"] == "fp32" and mixed["precision"] == "bf16-mixed" and mixed["status"] == "success"
    assert mixed["base_model_hash"] == fp32["base_model_hash"]  # same stored base ...
    assert len(list((out / "cache").glob("base-eval-*.json"))) == 2  # ... evaluated once per policy
