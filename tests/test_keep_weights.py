"""Kept weights (``run --keep-weights``) and re-scoring them on another suite without training (``evaluate``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from benchmark import weights
from benchmark.cli import main
from benchmark.evalcache import stage_model_key
from benchmark.records import RunRecord, read_json
from tests.conftest import TINY_RUN

LORA = "lora--tiny-world--tiny-world--seed0"
FULL = "full_ft--tiny-world--tiny-world--seed0"


def _run(out, methods: str, *flags: str) -> int:
    argv = ["-q", "run", "--methods", methods, "--output", str(out), *flags]
    for s in TINY_RUN:
        argv += ["--set", s]
    return main(argv)


def _record(out, run_id: str) -> RunRecord:
    return RunRecord.from_dict(read_json(out / "runs" / f"{run_id}.json"))


@pytest.fixture
def optimizer_steps(monkeypatch):
    """Counts every AdamW step (the training loop's optimizer) taken while the test runs."""
    calls = []
    real = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return calls


def test_final_weights_reload_and_rescore_on_another_suite_without_training(tmp_path, cache_dir, optimizer_steps,
                                                                               caplog):
    out = tmp_path / "out"
    assert _run(out, "full_ft,lora") == 0  # the default: final, but none for full fine-tuning
    assert optimizer_steps, "the run itself trains"
    lora, full = _record(out, LORA), _record(out, FULL)
    assert lora.kept_weights == [3] and weights.kept_stages(out, LORA) == [3]
    assert full.kept_weights is None and not (out / "weights" / FULL).exists()
    assert (out / "weights" / LORA / "stage-3" / "trainable.safetensors").is_file()
    state, info = weights.load(out, LORA, 3)
    assert info.model_key == lora.stages[-1].model_key and info.method_config == lora.method_config
    assert info.base_model_hash == lora.base_model_hash

    # reloaded as the stage loop would: fresh base, wrap, load -> the same model key as the record's
    from benchmark.config import make_config
    from benchmark.models import load_base
    from benchmark.plan import make_plan, method_runs
    from benchmark.runner import base_model_path

    plan = make_plan(make_config({"methods": ["lora"]}, TINY_RUN))
    run = method_runs(plan)[0]
    model, _ = load_base(plan.cfg.model, base_model_path(plan, quiet=True), plan.precision)
    method = run.cls(run.config)
    model = method.wrap(model)
    method.load_trainable_state(model, state)
    key = stage_model_key(lora.base_model_hash, run.cls, run.method_config, method.trainable_state(model))
    assert key == lora.stages[-1].model_key

    # re-scored on the validation suite: no optimizer step, new scores under the suite's name, R and G untouched
    optimizer_steps.clear()
    before = {rid: _record(out, rid) for rid in (LORA, FULL)}
    caplog.set_level("INFO")
    assert main(["evaluate", "--results", str(out), "--general", "tiny-world-val"]) == 0
    assert optimizer_steps == [], "evaluate never trains"
    after = _record(out, LORA)
    assert (after.R, after.G, after.stages) == (before[LORA].R, before[LORA].G, before[LORA].stages)
    extra = after.extra_general["tiny-world-val"]
    assert extra.tasks == ["tw_capital_val", "tw_continent_val", "tw_currency_val", "tw_element_val"]
    assert extra.stages == [0, 3] and len(extra.G) == 2 and all(len(g) == 4 for g in extra.G)
    assert extra.model_keys == [lora.base_model_hash, lora.stages[-1].model_key]
    assert extra.suite_id.startswith("tiny-world-val@") and len(extra.floor) == 4
    assert "weights kept for stage(s) 3 of 3 only" in caplog.text
    assert f"{FULL}: skipped: no kept weights" in caplog.text
    assert _record(out, FULL) == before[FULL], "a run without kept weights is left as it was"
    on_disk = json.loads((out / "runs" / f"{LORA}.json").read_text())
    assert on_disk["extra_general"]["tiny-world-val"]["G"] == extra.G  # what results/README.md documents
    table = pd.read_csv(out / "extra_scores.csv")  # the rebuilt tables list them, one row per stage x task
    assert len(table) == 2 * 4 and set(table["run_id"]) == {LORA} and set(table["suite"]) == {"tiny-world-val"}
    assert list(table["value"]) == [v for row in extra.G for v in row] and set(table["stage"]) == {0, 3}

    # a second evaluate is served from the cache and changes nothing
    caplog.clear()
    entries = sorted(p.name for p in (out / "cache").iterdir())
    assert main(["evaluate", "--results", str(out), "--general", "tiny-world-val"]) == 0
    assert sorted(p.name for p in (out / "cache").iterdir()) == entries
    assert caplog.text.count("on tiny-world-val: cache hit") == 2  # the base and stage 3
    assert _record(out, LORA) == after and optimizer_steps == []

    # on the run's own suite the rebuilt models give back the recorded G rows
    assert main(["evaluate", "--results", str(out), "--general", "tiny-world"]) == 0
    own = _record(out, LORA).extra_general["tiny-world"]
    assert own.G == [lora.G[0], lora.G[-1]] and optimizer_steps == []


def test_keep_none_keeps_nothing_and_all_keeps_every_stage_even_for_full_ft(tmp_path, cache_dir, caplog):
    none, every = tmp_path / "none", tmp_path / "all"
    assert _run(none, "lora", "--keep-weights", "none") == 0
    assert _record(none, LORA).kept_weights is None and not (none / "weights").exists()
    # the option changes no number: the finished run counts as done with another --keep-weights
    caplog.set_level("INFO")
    assert _run(none, "lora", "--keep-weights", "final") == 0
    assert "skipped: already finished" in caplog.text and not (none / "weights").exists()
    assert main(["evaluate", "--results", str(none), "--general", "tiny-world-val"]) == 0
    assert "extra_general" not in json.loads((none / "runs" / f"{LORA}.json").read_text())

    # an explicit choice overrides the full-model default of none
    assert _run(every, "full_ft", "--keep-weights", "all") == 0
    assert _record(every, FULL).kept_weights == [1, 2, 3] and weights.kept_stages(every, FULL) == [1, 2, 3]
    assert main(["evaluate", "--results", str(every), "--tasks", "tw_capital_val", "--stages", "final"]) == 0
    extra = _record(every, FULL).extra_general["tw_capital_val"]
    assert extra.stages == [0, 3] and extra.tasks == ["tw_capital_val"]
    assert main(["evaluate", "--results", str(every), "--tasks", "tw_capital_val"]) == 0  # every kept stage
    assert _record(every, FULL).extra_general["tw_capital_val"].stages == [0, 1, 2, 3]


def test_a_damaged_weights_file_is_refused(tmp_path):
    state = {"w": torch.arange(4, dtype=torch.float32)}
    weights.save(tmp_path, weights.KeptStage("r", 1, model_key="k"), state)
    got, info = weights.load(tmp_path, "r", 1)
    assert torch.equal(got["w"], state["w"]) and info.model_key == "k" and info.bytes > 0
    path = tmp_path / "weights" / "r" / "stage-1" / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError, match="sha256"):
        weights.load(tmp_path, "r", 1)
    assert weights.resolve_keep("auto", 10, 10) == "none" and weights.resolve_keep("auto", 3, 10) == "final"
    assert weights.resolve_keep("final", 10, 10) == "final"


@pytest.mark.parametrize("argv, message", [
    (["--results", "{missing}"], "results directory not found"),
    (["--results", "{empty}"], "no runs/ folder"),
    (["--results", "{ok}"], "needs a suite"),
    (["--results", "{ok}", "--general", "tiny-wrld-val"], "tiny-wrld-val"),
    (["--results", "{ok}", "--tasks", "tw_nope"], "tw_nope"),
    (["--results", "{ok}", "--tasks", "tw_capital_val,lm_eval:no_such_task"], "lm_eval:no_such_task"),
])
def test_evaluate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    folders = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "ok": tmp_path / "ok"}
    folders["empty"].mkdir()
    (folders["ok"] / "runs").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["evaluate", *[a.format(**folders) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
