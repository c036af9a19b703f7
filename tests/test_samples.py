"""Per-sample evaluation files (``eval.log_samples``): written for every stage, consistent with the recorded
scores, content-addressed next to the evaluation cache, and without any effect on a score."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.samples import read_samples, sample_row, write_samples
from tasks import TASKS
from tests.conftest import TINY_RUN

METHODS = "full_ft,lora"
ROW_FIELDS = {"task", "doc_id", "filter", "prompt", "target", "metrics"}


def _run(out: Path, *extra: str, methods: str = METHODS) -> int:
    argv = ["-q", "run", "--methods", methods, "--seeds", "0", "--output", str(out), *extra]
    for s in TINY_RUN:
        argv += ["--set", s]
    return main(argv)


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _stage_files(rec: dict) -> list[str]:
    """Samples file of each row of R and G: the base evaluation's, then each stage's."""
    return [rec["base_samples"]] + [s["samples"] for s in rec["stages"]]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cache_dir):
    """A tiny two-method run with the default ``eval.log_samples: local``."""
    out = tmp_path_factory.mktemp("samples-local")
    assert _run(out) == 0
    return out


@pytest.fixture(scope="module")
def none_run(tmp_path_factory, cache_dir):
    """The same run with ``eval.log_samples=none``."""
    out = tmp_path_factory.mktemp("samples-none")
    assert _run(out, "--set", "eval.log_samples=none") == 0
    return out


def test_every_stage_names_a_samples_file_with_one_row_per_document(local_run):
    recs = _records(local_run)
    assert len(recs) == 2
    for rec in recs.values():
        files = _stage_files(rec)
        assert len(files) == len(rec["R"]) == 4
        for rel in files:
            assert rel.startswith("samples/") and rel.endswith(".jsonl.gz") and (local_run / rel).is_file(), rel
            rows = read_samples(local_run / rel)
            by_task: dict[str, list[dict]] = {}
            for row in rows:
                by_task.setdefault(row["task"], []).append(row)
            assert list(by_task) == rec["tasks"] + rec["general_tasks"]  # every local task, in plan order
            for task, task_rows in by_task.items():
                assert [r["doc_id"] for r in task_rows] == list(range(rec["n_examples"][task]))  # 6 at eval.limit
                docs = TASKS.get(task).records("test")
                for r in task_rows:
                    assert ROW_FIELDS <= set(r) and r["prompt"], r
                    if _generates(task):
                        assert {"generation", "answer"} <= set(r) and r["answer"] == r["generation"].strip()
                    else:  # every option of the document (general: 4; tw_sentiment: 2; tw_topic: 4)
                        assert {"choices", "loglikelihoods", "is_greedy", "chosen"} <= set(r)
                        n = 4 if task in rec["general_tasks"] else len(docs[r["doc_id"]]["choices"])
                        assert len(r["choices"]) == len(r["loglikelihoods"]) == len(r["is_greedy"]) == n
                        assert [c.strip() for c in r["choices"]] == docs[r["doc_id"]]["choices"]
        # tiny-world's downstream tasks generate (tw_add) and classify by log-likelihood (tw_sentiment, tw_topic)
        assert [_generates(t) for t in rec["tasks"]] == [True, False, False]
        assert not any(_generates(t) for t in rec["general_tasks"])
    # the base evaluation is cached once for both methods, and so is its samples file
    full_ft, lora = recs.values()
    assert full_ft["base_samples"] == lora["base_samples"]
    files = sorted(p.name for p in (local_run / "samples").iterdir())
    assert len(files) == 1 + 3 + 3  # base + three stages per method
    keys = sorted(p.stem.rsplit("-", 1)[-1] for p in (local_run / "cache").glob("*.json"))
    assert [f[:-len(".jsonl.gz")] for f in files] == keys  # named by the evaluation cache key


def _generates(task: str) -> bool:
    return TASKS.get(task).output_type == "generate_until"


def _mc_acc(mc: list[dict]) -> float:
    """Accuracy of multiple-choice rows from their log-likelihoods (argmax, first of tied maxima)."""
    for r in mc:
        lls = r["loglikelihoods"]
        assert r["chosen"] == lls.index(max(lls))
        assert r["metrics"]["acc"] == float(r["chosen"] == r["target"])
    return sum(r["chosen"] == r["target"] for r in mc) / len(mc) * 100.0


def test_rows_reproduce_the_recorded_scores(local_run):
    """Exact match recomputed from the rows' answers gives R for a generation task, argmax of the log-likelihoods
    gives the acc in R of a downstream multiple-choice task and in G of every general task."""
    for rec in _records(local_run).values():
        assert any(map(_generates, rec["tasks"])) and not all(map(_generates, rec["tasks"]))  # both kinds in R
        for stage, rel in enumerate(_stage_files(rec)):
            rows = read_samples(local_run / rel)
            for i, task in enumerate(rec["tasks"]):
                if _generates(task):
                    hits = [float(r["answer"] == r["target"]) for r in rows if r["task"] == task]
                    assert sum(hits) / len(hits) * 100.0 == pytest.approx(rec["R"][stage][i], abs=1e-9)
                    assert [r["metrics"]["exact_match"] for r in rows if r["task"] == task] == hits
                else:
                    acc = _mc_acc([r for r in rows if r["task"] == task])
                    assert acc == pytest.approx(rec["R"][stage][i], abs=1e-9)
            for j, task in enumerate(rec["general_tasks"]):
                acc = _mc_acc([r for r in rows if r["task"] == task])
                assert acc == pytest.approx(rec["G"][stage][j], abs=1e-9)


def test_log_samples_none_writes_none_and_leaves_scores_identical(local_run, none_run):
    assert not (none_run / "samples").exists()
    for rec in _records(none_run).values():
        assert "base_samples" not in rec and all("samples" not in s for s in rec["stages"])
        assert rec["config"]["eval"]["log_samples"] == "none"
    assert (none_run / "scores.csv").read_bytes() == (local_run / "scores.csv").read_bytes()
    # the setting is not part of the evaluation cache key: both folders hold the same entries
    assert sorted(p.name for p in (none_run / "cache").iterdir()) == sorted(
        p.name for p in (local_run / "cache").iterdir())


def test_cache_hit_without_samples_is_evaluated_again(none_run, local_run, tmp_path, caplog):
    """Entries made with samples off get their file on the next run with samples on; the scores stay the same."""
    out = Path(shutil.copytree(none_run, tmp_path / "out"))
    before = _records(out)["lora--tiny-world--tiny-world--seed0"]
    with caplog.at_level(logging.INFO, logger="benchmark.scoring"):
        assert _run(out, "--force", methods="lora") == 0
    assert caplog.text.count("has no samples file; evaluating again") == 4  # base + three stages
    rec = _records(out)["lora--tiny-world--tiny-world--seed0"]
    assert rec["R"] == before["R"] and rec["G"] == before["G"]
    assert all(s["eval_seconds"] > 0 for s in rec["stages"])  # evaluated, not a cache hit
    for rel in _stage_files(rec):  # the same bytes as the run that had samples on from the start
        assert (out / rel).read_bytes() == (local_run / rel).read_bytes()


def test_log_samples_is_not_a_result_input():
    """Finished runs and checkpoints stay valid when only eval.log_samples changes (or is absent: schema < 1.4)."""
    from benchmark.records import result_inputs
    from benchmark.config import make_config

    def inputs(cfg: dict) -> dict:
        return result_inputs(cfg, "lora", {}, "tiny-world@x", 0, "fp32")

    on, off = make_config({}, ["eval.log_samples=all"]).to_dict(), make_config({}, []).to_dict()
    old = json.loads(json.dumps(off))
    del old["eval"]["log_samples"]
    assert inputs(on) == inputs(off) == inputs(old)


def test_generation_rows_reproduce_a_nonzero_exact_match(tmp_path, cache_dir):
    """A task whose targets are the model's own answers for half the documents: rows and score agree at 50."""
    from benchmark.config import make_config
    from benchmark.evaluate import evaluate
    from benchmark.models import load_base
    from benchmark.plan import make_plan
    from benchmark.runner import base_model_path
    from tasks import TASKS

    plan = make_plan(make_config({"output": str(tmp_path / "out")}, TINY_RUN))
    model, tok = load_base(plan.cfg.model, base_model_path(plan, quiet=True), plan.precision)
    add = TASKS.get("tw_add")  # tiny-world's generation task
    first = evaluate(model, tok, [add], batch_size=16, limit=6, log_samples="local").samples["tw_add"]
    docs = add.records("test")[:6]
    own = [{**d, "target": r["answer"] if i % 2 == 0 else "(none)"} for i, (d, r) in enumerate(zip(docs, first))]
    assert all(d["target"] for d in own)  # a generation that strips to nothing cannot be a target
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in own), encoding="utf-8")
    spec = dataclasses.replace(add, name="own_answers", data={"train": str(data), "test": str(data)}, root="")
    res = evaluate(model, tok, [spec], batch_size=16, log_samples="local")
    rows = res.samples["own_answers"]
    assert [r["answer"] for r in rows] == [r["answer"] for r in first]  # same prompts, same greedy answers
    hits = [float(r["answer"] == r["target"]) for r in rows]
    assert res.scores["own_answers"] == 50.0 == sum(hits) / len(hits) * 100.0


def test_local_keeps_the_harness_tasks_all_adds_lm_eval_tasks(tmp_path, monkeypatch):
    """Offline built-in-style suite (a group, two filters of a generation task, acc + acc_norm) next to a local
    task: ``local`` keeps only the local task's rows, ``all`` every lm-eval subtask's; scores never move."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmark.evaluate import evaluate
    from tasks import TASKS, resolve_suite
    from tests.realdata import make_tiny_model, write_fixture_suite

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    suite = resolve_suite(str(write_fixture_suite(tmp_path / "suite")))
    model_dir = make_tiny_model(tmp_path / "model")
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    kw = dict(batch_size=8, limit=2, fewshot=suite.fewshot, metrics=suite.metrics, include_path=suite.include_dir())
    res = {m: evaluate(model, tok, [TASKS.get("tw_capital")], suite.tasks, log_samples=m, **kw)
           for m in ("none", "local", "all")}
    assert res["none"].scores == res["local"].scores == res["all"].scores
    assert res["none"].samples == {} and list(res["local"].samples) == ["tw_capital"]
    assert set(res["all"].samples) == {"tw_capital", "fx_mmlu_a", "fx_mmlu_b", "fx_piqa", "fx_gsm8k"}
    gsm = res["all"].samples["fx_gsm8k"]
    assert sorted((r["doc_id"], r["filter"]) for r in gsm) == [(0, "flexible-extract"), (0, "strict-match"),
                                                               (1, "flexible-extract"), (1, "strict-match")]
    assert all(isinstance(r["generation"], str) and "Question:" in r["prompt"] for r in gsm)
    piqa = res["all"].samples["fx_piqa"]
    assert all(set(r["metrics"]) == {"acc", "acc_norm"} and len(r["choices"]) == 2 for r in piqa)


def test_sample_row_shapes_and_deterministic_files(tmp_path):
    """Rows from lm-eval's logged-sample layout; identical rows give byte-identical files."""
    import numpy as np

    gen = {"doc_id": 3, "target": "positive", "arguments": [["Review: ... Sentiment:", {"until": ["\n"]}]],
           "resps": [[" Chile"]], "filtered_resps": ["Chile"], "filter": "strip", "metrics": ["exact_match"],
           "exact_match": np.float64(0.0), "doc": {"prompt": "Review: ..."}}
    mc = {"doc_id": 0, "target": 1, "arguments": [["Q", " a"], ["Q", " b"], ["Q", " c"]],
          "resps": [[(-3.0, False)], [(-1.0, True)], [(-1.0, False)]],
          "filtered_resps": [(-3.0, False), (-1.0, True), (-1.0, False)], "filter": "none", "metrics": ["acc"],
          "acc": 1.0}
    rolling = {"doc_id": 0, "target": "", "arguments": [["some text"]], "resps": [[-12.5]],
               "filtered_resps": [-12.5], "filter": "none", "metrics": ["word_perplexity"], "word_perplexity": 3.0}
    assert sample_row("tw_sentiment", "generate_until", gen) == {
        "task": "tw_sentiment", "doc_id": 3, "filter": "strip", "prompt": "Review: ... Sentiment:",
        "target": "positive", "generation": " Chile", "answer": "Chile", "metrics": {"exact_match": 0.0}}
    row = sample_row("mc", "multiple_choice", mc)
    assert row["choices"] == [" a", " b", " c"] and row["loglikelihoods"] == [-3.0, -1.0, -1.0]
    assert row["is_greedy"] == [False, True, False] and row["chosen"] == 1  # first of tied maxima, as np.argmax
    assert sample_row("wt", "loglikelihood_rolling", rolling)["loglikelihoods"] == [-12.5]
    rows = [row, sample_row("tw_sentiment", "generate_until", gen)]
    write_samples(tmp_path / "a.jsonl.gz", rows)
    write_samples(tmp_path / "b.jsonl.gz", json.loads(json.dumps(rows)))
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert read_samples(tmp_path / "a.jsonl.gz") == json.loads(json.dumps(rows))
