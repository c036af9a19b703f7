"""The tiny-world v2 design rules, checked on the committed task data (docs/tinyworld.md says why each holds).

The rules on recorded runs (every method above every floor, an earlier task that survives, fwt not constant) are
checked on the published records in ``tests/test_published_tables.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tasks import SEQUENCES, SUITES, TASKS
from tasks.floors import measured_floor

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tasks" / "tinyworld"
SEQS = ("tiny-world", "tiny-world-val")


def _downstream() -> list:
    return [TASKS.get(n) for s in SEQS for n in SEQUENCES.get(s).tasks]


def _general() -> list:
    return [TASKS.get(n) for s in SEQS for n in SUITES.get(s).tasks]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+|\d", text))


def _pretraining_text() -> str:
    with open(DATA / "facts.jsonl", encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f)


def test_every_answer_token_occurs_in_pretraining():
    """A method that freezes the tied embeddings can only produce words the base model has seen as outputs."""
    seen = _words(_pretraining_text())
    for spec in _downstream():
        for split in ("train", "test"):
            for rec in spec.records(split):
                answers = rec["choices"] if spec.output_type == "multiple_choice" else [rec["target"]]
                missing = set().union(*(_words(a) for a in answers)) - seen
                assert not missing, f"{spec.name} {split}: answer words {sorted(missing)} never in pretraining"
    # the review words themselves are pretraining facts too (the polarity and topic lexicon)
    for spec in (TASKS.get("tw_sentiment"), TASKS.get("tw_topic")):
        body = {w for r in spec.records("train") for w in _words(r["prompt"].split(":", 1)[1].split(".")[0])}
        assert body - {"the", "was", "and"} <= seen


def test_every_evaluated_prompt_is_held_out_of_every_training_file():
    train = {r["prompt"] for spec in _downstream() for r in spec.records("train")}
    # the same adjective triple in another order or with another noun is not held out either
    def triple(p: str) -> frozenset[str] | None:
        m = re.match(r"Review: the \w+ was (\w+), (\w+) and (\w+)\.", p)
        return frozenset(m.groups()) if m else None

    train_triples = {triple(p) for p in train} - {None}
    test, val = set(), set()
    for spec in _downstream():
        target = val if spec.name.endswith("_val") else test
        target |= {r["prompt"] for r in spec.records("test")}
    assert not (test | val) & train
    assert not test & val
    assert not {triple(p) for p in test | val} & train_triples
    add = {tuple(sorted(map(int, p[:-1].split("+")))) for p in train if p[0].isdigit()}
    for p in test | val:
        if p[0].isdigit():
            assert tuple(sorted(map(int, p[:-1].split("+")))) not in add


def test_every_task_stores_its_measured_floor_and_declares_no_chance():
    for spec in _downstream() + _general():
        text = Path(spec.root, f"{spec.name}.yaml").read_text(encoding="utf-8")
        assert "chance" not in yaml.safe_load(text), spec.name
        assert spec.floor == measured_floor(spec), spec.name


def test_general_answers_are_balanced():
    """No answer-blind strategy scores more than chance + 5 on a general task (4 choices: 30)."""
    for spec in _general():
        n_choices = {len(r["choices"]) for r in spec.records("test")}
        assert n_choices == {4}, spec.name
        assert spec.floor <= 100 / 4 + 5, (spec.name, spec.floor)


def test_classification_is_log_likelihood_and_generation_is_exact_match():
    for spec in _downstream():
        labels = {tuple(r["choices"]) for r in spec.records("test")} if spec.choices else set()
        if spec.output_type == "multiple_choice":
            assert len(labels) == 1 and spec.metric == "acc", spec.name  # one fixed label set
        else:
            assert spec.metric == "exact_match" and spec.name.startswith("tw_add"), spec.name


@pytest.mark.parametrize("seq", SEQS)
def test_a_later_task_shares_its_format_with_an_earlier_one(seq):
    """Forward transfer and interference need shared structure: sentiment and topic read the same reviews."""
    tasks = [TASKS.get(n) for n in SEQUENCES.get(seq).tasks]
    prefixes = [spec.records("test")[0]["prompt"].split(":")[0] for spec in tasks]
    assert any(prefixes[j] == prefixes[i] for j in range(len(tasks)) for i in range(j)), prefixes


def test_validation_sequence_mirrors_the_test_sequence():
    """Defaults are chosen on tiny-world-val: the same training files, other evaluation records."""
    for test_name, val_name in zip(SEQUENCES.get("tiny-world").tasks, SEQUENCES.get("tiny-world-val").tasks):
        t, v = TASKS.get(test_name), TASKS.get(val_name)
        assert v.name == f"{t.name}_val" and t.path("train") == v.path("train") and t.path("test") != v.path("test")
        assert t.train_steps == v.train_steps
    general = {r["prompt"] for n in SUITES.get("tiny-world").tasks for r in TASKS.get(n).records("test")}
    general_val = {r["prompt"] for n in SUITES.get("tiny-world-val").tasks for r in TASKS.get(n).records("test")}
    assert general and general_val and not general & general_val
