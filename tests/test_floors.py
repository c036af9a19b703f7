"""Measured floors (tasks/floors.py) on hand-computed cases; ``chance`` is rejected; records carry the floors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark import records
from benchmark.errors import UserError
from tasks import load_task_yaml
from tasks.base import TaskSpec
from tasks.floors import measured_floor, task_floor


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def generation_task(tmp_path: Path, targets: list[str], metric: str = "exact_match") -> TaskSpec:
    rows = [{"prompt": f"q{i}", "target": t} for i, t in enumerate(targets)]
    return TaskSpec(name="t_gen", group="general", metric=metric, data={"test": _jsonl(tmp_path / "gen.jsonl", rows)})


def mc_task(tmp_path: Path, questions: list[tuple[list[str], int]]) -> TaskSpec:
    rows = [{"prompt": f"q{i}", "choices": c, "label": g} for i, (c, g) in enumerate(questions)]
    return TaskSpec(name="t_mc", group="general", output_type="multiple_choice", target="{{label}}",
                    choices="choices", metric="acc", data={"test": _jsonl(tmp_path / "mc.jsonl", rows)})


# -- generation: the best constant answer ------------------------------------------------------------------
def test_generation_floor_is_the_most_frequent_target(tmp_path):
    # "Paris" 3 times (" Paris " counts: exact match strips), "Rome" once, "Oslo" once -> 3 / 5 = 60
    spec = generation_task(tmp_path, ["Paris", "Rome", " Paris ", "Paris", "Oslo"])
    assert measured_floor(spec) == pytest.approx(60.0)


def test_generation_floor_all_distinct(tmp_path):
    # every target different: one constant is right once -> 1 / 3 = 33.33 (rounded to 0.01)
    assert measured_floor(generation_task(tmp_path, ["a", "b", "c"])) == pytest.approx(33.33)


def test_generation_floor_rouge_l(tmp_path):
    # targets "the cat", "the cat", "the dog"; ROUGE-L F1 of a constant answer against each target:
    #   "the cat": 1, 1, 0.5 (LCS "the": p = r = 1/2)  -> mean 2.5 / 3 = 83.33
    #   "the dog": 0.5, 0.5, 1                         -> mean 2 / 3   = 66.67   -> floor 83.33
    spec = generation_task(tmp_path, ["the cat", "the cat", "the dog"], metric="rouge_l")
    assert measured_floor(spec) == pytest.approx(83.33)


# -- multiple choice: constant position and frequency prior --------------------------------------------------
def test_mc_constant_position(tmp_path):
    # gold positions 0, 0, 0, 1 -> always choice 0 scores 3 / 4 = 75.
    # Texts are balanced (x gold twice, y twice, both offered everywhere): the prior ties in every question,
    # 1/2 credit each -> 2 / 4 = 50; the floor is the better of the two, 75.
    spec = mc_task(tmp_path, [(["x", "y"], 0), (["y", "x"], 0), (["x", "y"], 0), (["x", "y"], 1)])
    assert measured_floor(spec) == pytest.approx(75.0)


def test_mc_frequency_prior(tmp_path):
    # "Dollar" is gold twice and offered thrice; the third gold is "Peso" (gold once).
    #   q1 [Dollar, Euro, Yen], gold Dollar: Dollar (2) is the most frequent gold offered -> right
    #   q2 [Euro, Yen, Dollar], gold Dollar: -> right
    #   q3 [Peso, Dollar, Euro], gold Peso:  Dollar (2) beats Peso (1) -> wrong
    # prior 2 / 3 = 66.67; gold positions 0, 2, 0 -> constant position 2 / 3 too; chance would say 33.3
    spec = mc_task(tmp_path, [(["Dollar", "Euro", "Yen"], 0), (["Euro", "Yen", "Dollar"], 2),
                              (["Peso", "Dollar", "Euro"], 0)])
    assert measured_floor(spec) == pytest.approx(66.67)
    # positions 0, 2, 1 instead: constant position falls to 1 / 3, the prior still gives 2 / 3
    spec = mc_task(tmp_path, [(["Dollar", "Euro", "Yen"], 0), (["Euro", "Yen", "Dollar"], 2),
                              (["Dollar", "Peso", "Euro"], 1)])
    assert measured_floor(spec) == pytest.approx(66.67)


def test_mc_frequency_prior_ties_share_the_credit(tmp_path):
    # gold counts: A 2 (q1, q2), B 1 (q3); each question counts the golds of the *other* questions.
    #   q1 [A, B] gold A: A 1, B 1 -> tie, 1/2
    #   q2 [B, A] gold A: B 1, A 1 -> tie, 1/2
    #   q3 [A, B] gold B: A 2, B 0 -> A, wrong
    # prior (0.5 + 0.5 + 0) / 3 = 33.33; constant position (gold 0, 1, 1) 2 / 3 = 66.67 -> floor 66.67.
    spec = mc_task(tmp_path, [(["A", "B"], 0), (["B", "A"], 1), (["A", "B"], 1)])
    assert measured_floor(spec) == pytest.approx(66.67)
    # gold A in all three: every question sees A twice among the others -> "always A" is right everywhere: 100
    spec = mc_task(tmp_path, [(["A", "B"], 0), (["B", "A"], 1), (["A", "B"], 0)])
    assert measured_floor(spec) == pytest.approx(100.0)


def test_mc_unique_choice_texts_give_chance_not_100(tmp_path):
    # OBQA-style: every choice text occurs once. Counting a question's own gold would make each gold "the most
    # frequent answer" (floor 100); leaving it out, all counts are 0, a 1/3 tie everywhere -> 33.33, and the
    # balanced gold positions 0, 1, 2 also give 33.33.
    spec = mc_task(tmp_path, [(["a1", "b1", "c1"], 0), (["a2", "b2", "c2"], 1), (["a3", "b3", "c3"], 2)])
    assert measured_floor(spec) == pytest.approx(33.33)


def test_mc_gold_given_as_text(tmp_path):
    # a target that renders to the choice text (not an index) is located in the choices: gold 0, 1 -> 50
    rows = [{"prompt": "a", "choices": ["yes", "no"], "gold": "yes"},
            {"prompt": "b", "choices": ["yes", "no"], "gold": "no"}]
    spec = TaskSpec(name="t_mc_text", group="general", output_type="multiple_choice", target="{{gold}}",
                    choices="choices", metric="acc", data={"test": _jsonl(tmp_path / "t.jsonl", rows)})
    assert measured_floor(spec) == pytest.approx(50.0)


# -- the stored floor --------------------------------------------------------------------------------------
def test_task_floor_prefers_the_stored_floor(tmp_path):
    missing = TaskSpec(name="t_stored", group="general", floor=12.5, data={"test": str(tmp_path / "nope.jsonl")})
    assert task_floor(missing) == 12.5  # the test split is never read
    assert task_floor(generation_task(tmp_path, ["a", "a", "b", "c"])) == pytest.approx(50.0)  # measured


def test_task_floor_measures_once_per_spec(tmp_path, monkeypatch):
    import tasks.floors as floors

    calls = []
    monkeypatch.setattr(floors, "measured_floor", lambda spec: calls.append(spec.name) or 7.0)
    spec = generation_task(tmp_path, ["a"])
    assert floors.task_floor(spec) == floors.task_floor(spec) == 7.0 and calls == ["t_gen"]  # one per sweep


def test_builtin_stored_floors_equal_the_measured_ones():
    from tasks import TASKS

    checked = 0
    for name in TASKS.names():
        spec = TASKS.get(name)
        if spec.floor is not None and spec.source is None and spec.preprocess is None:  # local data only
            assert spec.floor == measured_floor(spec), name
            checked += 1
    assert checked  # the tiny-world tasks store their floors


@pytest.mark.parametrize("bad", [-1.0, 100.5, float("nan"), True, "25"])
def test_invalid_floor(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid floor"):
        TaskSpec(name="t_bad", group="general", floor=bad, data={"test": str(tmp_path / "t.jsonl")})


def test_unset_floor_keeps_the_content_hash(tmp_path):
    # the hash this spec had before floors existed (chance 0.0, the old default, was part of it)
    (tmp_path / "test.jsonl").write_text('{"prompt": "1+1=", "target": "2"}\n{"prompt": "2+2=", "target": "4"}\n')
    (tmp_path / "train.jsonl").write_text('{"prompt": "3+3=", "target": "6"}\n')
    kw = {"name": "t_hash", "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}
    before = "7966983ae34f9ba13b39559c7290c8dfa92e66cc80f35c08ccceecd5a0f73bb1"
    assert TaskSpec(**kw).content_hash() == before
    assert TaskSpec(**kw, floor=0.0).content_hash() != before  # a stored floor, even 0, is part of the task


# -- chance is rejected ------------------------------------------------------------------------------------
def test_chance_in_python_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"^task 't_old': 'chance' is no longer accepted: .*tasks/floors\.py"):
        TaskSpec(name="t_old", group="general", chance=25.0, data={"test": str(tmp_path / "t.jsonl")})


def test_chance_in_yaml_is_a_one_line_user_error(tmp_path):
    (tmp_path / "old.yaml").write_text("name: old_mc\ngroup: general\nmetric: acc\nchance: 25.0\n"
                                       "data:\n  test: old.jsonl\n")
    with pytest.raises(UserError) as info:
        load_task_yaml(tmp_path / "old.yaml")
    msg = str(info.value)
    assert "\n" not in msg and "old.yaml" in msg
    assert "task 'old_mc': 'chance' is no longer accepted: the floor is measured from the test split " \
           "(tasks/floors.py); remove it" in msg


def test_unknown_yaml_key_is_a_user_error_too(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\ngroup: general\nflor: 25.0\ndata:\n  test: t.jsonl\n")
    with pytest.raises(UserError, match="typo.yaml.*flor"):
        load_task_yaml(tmp_path / "typo.yaml")


# -- run records ---------------------------------------------------------------------------------------------
def test_record_readers_fall_back_to_general_chance():
    def rec(**fields):
        return records.RunRecord.from_dict({"run_id": "r", **fields})

    new = {"general_tasks": ["a", "lm_eval:b"], "general_floor": [25.2, None], "tasks": ["x", "y"],
           "task_floors": [3.0, 50.0]}
    assert records.general_floor(rec(**new)) == [25.2, 0.0]  # unknown (built-in task) counts as 0
    assert records.task_floors(rec(**new)) == [3.0, 50.0]
    old = {"general_tasks": ["a", "b"], "general_chance": [25.0, 50.0], "tasks": ["x"]}  # schema <= 1.4
    assert records.general_floor(rec(**old)) == [25.0, 50.0]
    assert records.task_floors(rec(**old)) == [None]
    assert records.general_floor(rec(general_tasks=["a", "b"], tasks=[])) == [0.0, 0.0]
    assert records.general_floor(rec(general_tasks=[], general_chance=[])) == []


def test_old_published_record_still_scores():
    from benchmark import metrics

    recs = [json.loads(p.read_text()) for p in Path(__file__).resolve().parent.parent.glob("results/*/runs/*.json")]
    rec = next((r for r in recs if "general_chance" in r and r.get("status") == "success" and r.get("G")), None)
    if rec is None:
        pytest.skip("no published record of schema 1.4 or older")
    assert "general_floor" not in rec
    typed = records.RunRecord.from_dict(rec)
    out = metrics.compute_all(typed.R, typed.G, records.general_floor(typed), task_floors=records.task_floors(typed))
    assert out["general_delta_norm"].value is not None
    assert out["plasticity_floor_margin"].value is None and "floor" in out["plasticity_floor_margin"].reason


def test_new_record_stores_the_floors():
    from benchmark.config import make_config
    from benchmark.plan import make_plan, method_runs
    from benchmark.records import SCHEMA_VERSION
    from benchmark.stages import new_record

    plan = make_plan(make_config({"methods": ["lora"]}))
    rec = new_record(plan, method_runs(plan)[0]).to_dict()
    assert SCHEMA_VERSION == "1.5" and rec["schema_version"] == "1.5" and "general_chance" not in rec
    assert rec["general_floor"] == [task_floor(g) for g in plan.general] + [None] * len(plan.general_builtin)
    assert rec["task_floors"] == [task_floor(t) for t in plan.tasks]
    assert len(rec["task_floors"]) == len(rec["tasks"]) and all(isinstance(f, float) for f in rec["task_floors"])
