"""The real benchmarks (O-LoRA orders 1-6, TRACE, SLIM) and general suites, offline on upstream-schema fixtures.

``prepare`` runs with the hub download replaced by a fixture reader (no network), then every task of every real
sequence loads from the prepared copy and is evaluated once, and each sequence runs two tiny stages end to end
on a tiny random Llama saved to a local folder (``--model <dir>``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from tests.realdata import FIXTURES, TINY_REAL_RUN, fake_hub_load, fixture_rows, make_tiny_model, write_fixture_suite

REAL_SEQUENCES = ["olora-order1", "olora-order2", "olora-order3", "olora-order4", "olora-order5", "olora-order6",
                  "trace", "slim-mds", "slim-seq"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Prepared data root (from the fixture 'hub' and TRACE folder), a tiny model dir and an offline suite."""
    import datasets

    import shutil

    base = tmp_path_factory.mktemp("real")
    model, suite = make_tiny_model(base / "model"), write_fixture_suite(base / "suite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tasks.sources.hub_load", fake_hub_load)
        mp.setattr("benchmark.prepare.download_model",
                   lambda model_id, revision, target: str(shutil.copytree(model, target)))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(base / "hf-cache"))  # lm-eval's json tasks
        mp.setenv("FORGETBENCH_DATA", str(base / "data"))
        mp.setenv("FORGETBENCH_TRACE_DIR", str(FIXTURES / "trace"))
        for seq in REAL_SEQUENCES:
            assert main(["-q", "prepare", "--sequence", seq, "--general", "tiny-world"]) == 0
        # lm-eval tasks of a suite (here built-in-style YAMLs over local files) and a hub model snapshot
        assert main(["-q", "prepare", "--sequence", "olora-order1", "--general", str(suite),
                     "--model", "someone/tiny-model"]) == 0
        mp.delenv("FORGETBENCH_TRACE_DIR")  # from here on, TRACE comes from the prepared copy
        from tasks import TASKS

        for name in TASKS.names():  # forget records memoised while preparing: runs read the prepared files
            TASKS.get(name)._cache.clear()
        yield {"data": base / "data", "model": model, "suite": suite, "base": base}
    for name in TASKS.names():
        TASKS.get(name)._cache.clear()
    from tasks import SEQUENCES

    for name in [n for n in SEQUENCES.names() if n.endswith("-head2")]:  # registered by the tests below
        SEQUENCES.unregister(name)


def _real_task_names() -> list[str]:
    from tasks import SEQUENCES

    names: list[str] = []
    for seq in REAL_SEQUENCES:
        names += [t for t in SEQUENCES.get(seq).tasks if t not in names]
    return names


def test_prepare_writes_manifest_with_ids_revisions_and_hashes(env):
    manifest = json.loads((env["data"] / "manifest.json").read_text())
    entries = manifest["datasets"]
    agnews = entries["olora_agnews/train"]
    assert (agnews["dataset"], agnews["config"], agnews["upstream_split"]) == ("fancyzhx/ag_news", None, "train")
    assert agnews["revision"] == "main" and agnews["sample"]["per_class"] == 1000
    assert entries["olora_mnli/test"]["upstream_split"] == "validation_matched"
    assert entries["trace_fomc/test"]["type"] == "local" and entries["slim_mix/*"]["components"]
    for e in entries.values():
        if "sha256" in e and e["type"] != "packaged":
            data = (env["data"] / e["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"] and data.count(b"\n") == e["rows"]
    assert {p["sequence"] for p in manifest["prepared"]} == set(REAL_SEQUENCES)
    assert {"fx_mmlu_a", "fx_mmlu_b", "fx_piqa", "fx_gsm8k"} <= set(manifest["lm_eval_tasks"])
    assert manifest["lm_eval_tasks"]["fx_piqa"]["dataset_path"] == "json"
    snapshot = Path(manifest["models"]["someone/tiny-model"]["path"])
    assert snapshot == env["data"] / "models" / "someone_tiny-model" and (snapshot / "config.json").is_file()


def test_per_class_sampling_is_deterministic():
    from tasks.sources import select_rows

    labels = [0, 1, 0, 1, 2, 0, 2, 1]
    rule = {"per_class": 2, "label": "label", "seed": 0}
    picked = select_rows(labels, len(labels), rule)
    assert picked == select_rows(labels, len(labels), rule) == sorted(picked)
    assert sorted(labels[i] for i in picked) == [0, 0, 1, 1, 2, 2]
    assert len(select_rows(labels, 8, {"max_rows": 3, "seed": 1})) == 3


def test_every_real_task_loads_in_upstream_schema_and_evaluates(env):
    """All 15 O-LoRA, 8 TRACE and 4 SLIM tasks: records render, MC targets are choices, lm-eval scores each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmark.evaluate import evaluate
    from benchmark.validate import check_task_data
    from tasks import TASKS

    names = _real_task_names()
    assert len(names) == 15 + 8 + 4
    specs = [TASKS.get(n) for n in names]
    for spec in specs:
        check_task_data(spec)
    # upstream schema reaches the templates unchanged: an O-LoRA label id becomes its label word
    yahoo = TASKS.get("olora_yahoo").records("train")[0]
    assert set(yahoo) == set(fixture_rows("fancyzhx/yahoo_answers_topics", None, "train")[0])
    from tasks.templates import answer_text, render

    assert answer_text(TASKS.get("olora_yahoo"), yahoo) == "Sports"
    agnews = TASKS.get("olora_agnews")
    prompt = render(agnews.prompt, agnews.records("test")[0])
    assert prompt.startswith("What is the topic")
    assert "Option: World, Sports, Business, Science or Technology \n" in prompt
    assert TASKS.get("trace_scienceqa").records("test")[1]["label"] == "B"
    assert answer_text(TASKS.get("slim_obqa"), TASKS.get("slim_obqa").records("train")[0]) == "star"
    mix = TASKS.get("slim_mix").records("train")
    assert {r["source"] for r in mix} == {"slim_obqa", "slim_siqa", "slim_boolq"}

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(env["model"])
    tok = AutoTokenizer.from_pretrained(env["model"])
    res = evaluate(model, tok, specs, batch_size=8, limit=1)
    assert set(res.scores) == set(names) and all(0.0 <= v <= 100.0 for v in res.scores.values())
    assert res.metrics["trace_meetingbank"].startswith("rouge_l")
    assert res.metrics["trace_py150"].startswith("edit_sim")
    assert res.metrics["olora_dbpedia"].startswith("exact_match") and res.metrics["slim_mix"].startswith("acc")


def test_unprepared_data_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from tasks import TASKS

    monkeypatch.setenv("FORGETBENCH_DATA", str(tmp_path / "empty"))
    TASKS.get("olora_dbpedia")._cache.clear()
    assert main(["run", "--sequence", "olora-order1", "--dry-run", "--general", "tiny-world"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not prepared" in err and "benchmark prepare" in err


def _head2(seq_name: str, general=None) -> str:
    """Register ``<seq>-head2``: the sequence's first two stages (same tasks, suite and step overrides)."""
    from tasks import SEQUENCES, SequenceSpec

    seq = SEQUENCES.get(seq_name)
    name = f"{seq_name}-head2"
    if name not in SEQUENCES:
        SEQUENCES.register(name, SequenceSpec(name=name, tasks=seq.tasks[:2], general=seq.general, steps=seq.steps),
                           origin="test")
    return name


@pytest.mark.slow
@pytest.mark.parametrize("sequence,extra", [
    ("olora-order1", ["--general", "SUITE"]),  # the offline built-in-style suite: groups, per-task few-shot
    ("olora-order4", ["--set", "train.gradient_checkpointing=true", "--set", "train.grad_accum=2"]),
    ("trace", ["--set", "model.chat_template=true"]),
    ("slim-mds", []),  # SLIM's multi-dataset setting: one stage on the mixture (slim-seq's tasks are its parts)
])
def test_real_sequence_runs_two_tiny_stages(env, tmp_path, sequence, extra):
    name = _head2(sequence) if sequence != "slim-mds" else sequence
    out = tmp_path / "out"
    argv = ["-q", "run", "--sequence", name, "--model", str(env["model"]), "--methods", "lora", "--output", str(out)]
    argv += [a.replace("SUITE", str(env["suite"].parent / "fixture-suite-small.yaml")) for a in extra]
    if "--general" not in extra:
        argv += ["--general", "tiny-world"]
    for s in TINY_REAL_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    rec = json.loads(next((out / "runs").glob("*.json")).read_text())
    n = 1 if sequence == "slim-mds" else 2
    assert rec["status"] == "success" and len(rec["R"]) == n + 1 and all(len(r) == n for r in rec["R"])
    assert len(rec["G"]) == n + 1 and all(len(g) == len(rec["general_tasks"]) for g in rec["G"])
    assert rec["config"]["model"]["name"] == str(env["model"])
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == (n + 1) * (n + len(rec["general_tasks"]))
    if "SUITE" in " ".join(extra):
        assert rec["general_tasks"] == ["lm_eval:fx_mmlu", "lm_eval:fx_piqa"]
        assert rec["n_examples"]["fx_mmlu"] == 4  # the group's two subtasks at eval.limit=2


def test_suite_few_shot_per_task_groups_and_metric_keys(env):
    """An offline built-in-style suite: one lm-eval call per few-shot count, group score, named metric key."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmark.evaluate import evaluate
    from tasks import resolve_suite

    suite = resolve_suite(str(env["suite"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(env["model"])
    tok = AutoTokenizer.from_pretrained(env["model"])
    res = evaluate(model, tok, [], suite.tasks, batch_size=8, fewshot=suite.fewshot, metrics=suite.metrics,
                   include_path=suite.include_dir())
    assert res.fewshot == {"fx_mmlu": 2, "fx_piqa": 0, "fx_gsm8k": 1}
    assert res.n_examples == {"fx_mmlu": 8, "fx_piqa": 2, "fx_gsm8k": 3}  # a group counts its subtasks' docs
    assert res.metrics["fx_gsm8k"] == "exact_match,strict-match" and res.metrics["fx_mmlu"].startswith("acc")


def test_builtin_suites_name_real_lm_eval_tasks():
    """Every lm-eval task of the shipped suites is defined in lm-eval's own task YAMLs (read as text: no index
    build, nothing downloaded)."""
    import re

    import lm_eval.tasks

    from tasks import SEQUENCES, SUITES

    known: set[str] = set()
    pattern = re.compile(r"^(?:task|group): *['\"]?([\w.-]+)['\"]? *$", re.MULTILINE)
    for p in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        known.update(pattern.findall(p.read_text(encoding="utf-8", errors="replace")))
    for name in SUITES.names():
        for t in SUITES.get(name).tasks:
            if t.startswith("lm_eval:"):
                assert t.split(":", 1)[1] in known, (name, t)
    for seq in REAL_SEQUENCES:
        assert SEQUENCES.get(seq).general.name in SUITES.names()


def test_trace_reads_the_local_folder_directly(monkeypatch):
    from tasks import TASKS

    spec = TASKS.get("trace_fomc")
    spec._cache.clear()
    monkeypatch.setenv("FORGETBENCH_TRACE_DIR", str(FIXTURES / "trace"))
    rows = spec.records("train")
    assert rows == json.loads((FIXTURES / "trace" / "FOMC" / "train.json").read_text())
    spec._cache.clear()


def test_chat_template_wraps_prompt_and_trains_on_the_assistant_turn(env):
    from transformers import AutoTokenizer

    from benchmark.data import encode_example
    from tasks import TASKS

    tok = AutoTokenizer.from_pretrained(env["model"])
    spec = TASKS.get("trace_fomc")
    ex = encode_example(spec, {"prompt": "Stance:", "answer": "dovish"}, tok, 512, chat=True)
    text = tok.decode(ex.input_ids)
    assert text == "<|user|>Stance:<|end|>\n<|assistant|>dovish<|end|>\n"
    answer = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
    assert answer == "dovish<|end|>\n"
