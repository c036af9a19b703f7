"""The harness's in-process scores equal lm-eval's own entry point, ``lm_eval.simple_evaluate``, on a saved model.

A small Llama is trained for a few hundred steps through the harness's own training code on the tiny-world capital
facts and the ``tw_add`` / ``tw_sentiment`` training splits, then saved (model and tokenizer) to a folder. That
folder is evaluated twice on real tiny-world tasks (``tw_capital`` and ``tw_sentiment``: multiple choice, a general
and a downstream one; ``tw_add``: greedy generation) and on ``tw_sentiment_gen``, the same reviews answered by greedy
generation of the label word after a space (tiny-world v1's sentiment task, rebuilt in ``tests/conftest.py``):

- by the harness: :func:`benchmark.models.load_base` + :func:`benchmark.evaluate.evaluate` (task configs built by
  ``lm_eval_task_config``, records handed over in memory, lm-eval's ``HFLM`` on the model object);
- by lm-eval alone: ``simple_evaluate(model="hf", model_args="pretrained=<folder>", ...)`` on the same tasks
  written as plain lm-eval YAML files (``dataset_path: json`` over the task's JSONL file).

Scores must be equal exactly, and so must every document's requests, log-likelihoods and generations. The models
are trained far enough that the scores are neither trivial nor at chance, so a different BOS policy or a different
context/continuation boundary moves them: the last test checks that forcing the BOS off in the harness is caught.
One tokenizer family prepends a BOS (Llama-2 style), the other is the tiny-world byte-level one without BOS.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end runs of minutes (see pyproject's markers)

TASK_NAMES = ("tw_capital", "tw_add", "tw_sentiment", "tw_sentiment_gen")
FAMILY_NAMES = ("sentencepiece_bos", "tinyworld")
BATCH_SIZE = 64
TRAIN_STEPS = 400
TRAIN_LR = 3e-3


def _specs():
    from tasks import TASKS
    from tests.conftest import sentiment_generation_task

    specs = [TASKS.get(n) for n in TASK_NAMES[:-1]] + [sentiment_generation_task(TASK_NAMES[-1])]
    assert [s.output_type for s in specs] == ["multiple_choice", "generate_until"] * 2
    return specs


def _train_folder(family: str, out_dir):
    """Train a small Llama with tokenizer ``family`` through the harness's training code; save it to ``out_dir``."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmark.config import TrainConfig
    from benchmark.data import encode_task, encode_texts
    from benchmark.models import TINYWORLD_DATA
    from benchmark.train import train_stage
    from tasks import TASKS
    from tests.tokenizer_families import FAMILIES

    tok = FAMILIES[family]()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with open(TINYWORLD_DATA / "facts.jsonl", encoding="utf-8") as f:
        facts = [r["text"] for r in map(json.loads, f) if r["relation"] == "capital"]
    # the capital facts repeated (tw_capital asks exactly these), a slice of sentiment (else it is learnt to 100%)
    examples = (encode_texts(facts, tok, max_len=64) * 4
                + encode_task(TASKS.get("tw_sentiment"), tok, max_len=64, limit=300)
                + encode_task(TASKS.get("tw_add"), tok, max_len=64))
    cfg = TrainConfig(batch_size=32, scheduler="constant", warmup_steps=0, precision="fp32")
    train_stage(model, None, examples, TRAIN_STEPS, cfg, TRAIN_LR, torch.Generator().manual_seed(0), tok.pad_token_id,
                Accelerator(cpu=True), quiet=True, data_parallel=False)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return tok


def _write_plain_yamls(specs, yaml_dir, data_cache) -> None:
    """Each spec as the plain lm-eval YAML a user would write for it (no Python, no harness code)."""
    import yaml

    for spec in specs:
        cfg = {
            "task": spec.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(spec.path("test"))}, "cache_dir": str(data_cache)},
            "test_split": "test",
            "output_type": spec.output_type,
            "doc_to_text": spec.prompt,
            "doc_to_target": spec.eval_target or spec.target,
            "target_delimiter": spec.target_delimiter,
            "num_fewshot": 0,
            "metadata": {"version": spec.version},
        }
        if spec.output_type == "multiple_choice":
            cfg["doc_to_choice"] = spec.choices  # a record field: lm-eval takes the list as it is
            cfg["metric_list"] = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
        else:
            cfg["generation_kwargs"] = {"until": list(spec.until), "do_sample": False,
                                        "max_gen_toks": spec.max_gen_toks}
            cfg["metric_list"] = [{"metric": spec.metric, "aggregation": "mean", "higher_is_better": True}]
            steps = [{"function": "remove_whitespace"}]
            if spec.answer_regex:
                steps.append({"function": "regex", "regex_pattern": spec.answer_regex, "group_select": 0})
            cfg["filter_list"] = [{"name": "strip", "filter": steps + [{"function": "take_first"}]}]
        (yaml_dir / f"{spec.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def _simple_evaluate(folder, yaml_dir) -> dict:
    """lm-eval's own entry point on the saved folder; the global RNG states are put back afterwards."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        return lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder}", tasks=list(TASK_NAMES), num_fewshot=0,
            batch_size=BATCH_SIZE, device="cpu", log_samples=True, bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False, verbosity="ERROR"))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _harness_evaluate(folder, monkeypatch) -> tuple[dict[str, float], dict[str, list]]:
    """The harness's scores (points) on the folder loaded as a run loads its base, and lm-eval's samples of that
    same call (``lm_eval.evaluate`` asked for them, nothing else changed)."""
    import lm_eval

    from benchmark.config import ModelConfig
    from benchmark.evaluate import evaluate
    from benchmark.models import load_base

    model, tok = load_base(ModelConfig(name=str(folder)), precision="fp32")
    real, seen = lm_eval.evaluate, {}

    def with_samples(*args, **kwargs):
        kwargs["log_samples"] = True
        out = real(*args, **kwargs)
        seen.update(out["samples"])
        return out

    with monkeypatch.context() as m:
        m.setattr(lm_eval, "evaluate", with_samples)
        res = evaluate(model, tok, _specs(), batch_size=BATCH_SIZE)
    return res.scores, seen


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU machine training is several times faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def reference(request, tmp_path_factory, one_thread):
    """(family, saved folder, in-memory tokenizer, simple_evaluate's output) per tokenizer family."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    folder, yaml_dir = root / "model", root / "tasks"
    yaml_dir.mkdir()
    tok = _train_folder(request.param, folder)
    _write_plain_yamls(_specs(), yaml_dir, root / "datasets")
    # conftest's no_network is function-scoped: guard the module-scoped lm-eval run the same way
    from tests.conftest import block_network

    block_network(mp)
    try:
        out = _simple_evaluate(folder, yaml_dir)
    finally:
        mp.undo()
    yield request.param, folder, tok, out


def _lm_eval_score(out: dict, spec) -> float:
    from benchmark.evaluate import spec_metric

    res = out["results"][spec.name]
    (key,) = [k for k in res if k.split(",")[0] == spec_metric(spec) and "stderr" not in k]
    return float(res[key]) * 100.0


def _comparable(sample: dict) -> dict:
    """What a document's sample says about the model's inputs and outputs (not hashes or the doc object)."""
    return {k: sample[k] for k in ("doc_id", "target", "arguments", "resps", "filtered_resps", "filter")}


def test_saved_tokenizer_encodes_as_the_trained_one(reference):
    """The folder's tokenizer (what both evaluations load) encodes the task texts as training did."""
    from transformers import AutoTokenizer

    family, folder, tok, _ = reference
    loaded = AutoTokenizer.from_pretrained(folder)
    texts = ["The capital of Chad is N'Djamena", "45+16=", "Review: the film was dull. Sentiment: negative", " x"]
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (loaded.bos_token_id is not None) == (family == "sentencepiece_bos")
    if family == "sentencepiece_bos":
        assert loaded.encode("45+16=")[0] == loaded.bos_token_id


def test_harness_scores_equal_simple_evaluate(reference, monkeypatch):
    from tasks import TASKS

    family, folder, _, out = reference
    scores, samples = _harness_evaluate(folder, monkeypatch)
    expected = {s.name: _lm_eval_score(out, s) for s in _specs()}
    print(f"{family}: harness {scores} lm-eval {expected}")
    assert scores == expected
    # the scores say something: multiple choice above its floor (tw_capital: 25.2, tw_sentiment: 50) and below
    # 100, each generation task neither 0 nor 100
    assert scores["tw_capital"] >= 35.0
    assert TASKS.get("tw_sentiment").floor < scores["tw_sentiment"] < 100.0
    assert 0.0 < scores["tw_add"] < 100.0 and 0.0 < scores["tw_sentiment_gen"] < 100.0
    for spec in _specs():
        ours = sorted((_comparable(s) for s in samples[spec.name]), key=lambda s: s["doc_id"])
        theirs = sorted((_comparable(s) for s in out["samples"][spec.name]), key=lambda s: s["doc_id"])
        assert len(ours) == len(theirs) == len(spec.records("test"))
        for a, b in zip(ours, theirs):
            assert a == b, f"{family} {spec.name} doc {a['doc_id']}: harness {a} != lm-eval {b}"


def test_parity_check_catches_a_bos_mismatch(reference, monkeypatch):
    """Evaluating without the BOS the tokenizer adds (lm-eval's ``add_bos_token=False``) moves every score."""
    family, folder, _, out = reference
    if family != "sentencepiece_bos":
        pytest.skip("only a tokenizer with a BOS can lose it")
    import benchmark.evaluate as ev

    cls = ev._memo_hflm_class()  # noqa: SLF001 -- the class the harness evaluates with

    class NoBos(cls):
        def __init__(self, *args, **kwargs):
            kwargs["add_bos_token"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ev, "_memo_hflm_class", lambda: NoBos)
    scores, samples = _harness_evaluate(folder, monkeypatch)
    expected = {s.name: _lm_eval_score(out, s) for s in _specs()}
    print(f"{family} without BOS: harness {scores} lm-eval {expected}")
    assert scores["tw_capital"] != expected["tw_capital"] and scores != expected
    for spec in _specs():  # and the per-document check sees it in every task, whatever the scores do
        name = spec.name
        theirs = {s["doc_id"]: s["resps"] for s in out["samples"][name]}
        moved = sum(s["resps"] != theirs[s["doc_id"]] for s in samples[name])
        # every log-likelihood; some generations
        least = len(theirs) if spec.output_type == "multiple_choice" else 1
        assert moved >= least, (name, moved)
