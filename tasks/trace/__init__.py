"""TRACE (Wang et al., 2023, arXiv:2310.06762): eight continual-learning datasets from its local JSON files.

TRACE distributes ``<dataset>/{train,eval,test}.json`` files of ``{"prompt", "answer"}`` records (a JSON array;
``BeyonderXX/TRACE`` README). Point forgetbench at the folder holding the eight dataset folders with
``FORGETBENCH_TRACE_DIR=/data/LLM-CL-Benchmark_5000`` or ``--set data_roots.trace=...``, or copy them into the
data root with ``python -m benchmark prepare --sequence trace``. The prompt already holds TRACE's instruction; the
model continues it with the answer (no delimiter).

Order and steps: C-STANCE -> FOMC -> MeetingBank -> Py150 -> ScienceQA -> NumGLUE-cm -> NumGLUE-ds -> 20Minuten
with TRACE's epochs 5,3,7,5,3,5,5,7 (``scripts/train_seq_naive.sh``), turned into steps at
``train.batch_size=64`` on 5,000 training examples (epochs x 79 steps; scale with ``train.steps_scale``).

Metrics: exact match for C-STANCE, FOMC and the NumGLUE tasks (TRACE: accuracy); ROUGE-L for MeetingBank; character
similarity for Py150 (TRACE: fuzzy-match similarity); the answer letter for ScienceQA (TRACE scores the letter
and, separately, the reasoning). 20Minuten is scored by ROUGE-L here: TRACE uses SARI, which needs the source
sentence and is not implemented (a documented deviation). Evaluation is greedy; TRACE samples (temperature 0.1).
"""

from __future__ import annotations

import re

from tasks.base import TASKS, SequenceSpec, TaskSpec

# name: (folder, metric, max_gen_toks, until, epochs)
TABLE = {
    "cstance": ("C-STANCE", "exact_match", 8, ["\n"], 5),
    "fomc": ("FOMC", "exact_match", 8, ["\n"], 3),
    "meetingbank": ("MeetingBank", "rouge_l", 256, [], 7),
    "py150": ("Py150", "edit_sim", 64, ["<EOL>", "\n"], 5),
    "scienceqa": ("ScienceQA", "exact_match", 32, [], 3),
    "numglue_cm": ("NumGLUE-cm", "exact_match", 16, ["\n"], 5),
    "numglue_ds": ("NumGLUE-ds", "exact_match", 16, ["\n"], 5),
    "20minuten": ("20Minuten", "rouge_l", 256, [], 7),
}
STEPS_PER_EPOCH = 79  # ceil(5000 / 64)
_ANSWER = re.compile(r"Answer:\s*([A-Z])")


def scienceqa_letter(record: dict, **_: object) -> dict:
    """Add ``label``: the answer letter TRACE scores ScienceQA by ("Answer: B\\nBecause ..." -> "B")."""
    m = _ANSWER.search(record.get("answer", ""))
    record["label"] = m.group(1) if m else record.get("answer", "").strip()[:1]
    return record


def make_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of one TRACE dataset, read from the local folder ``<trace dir>/<folder>/``."""
    folder, metric, max_gen, until, epochs = TABLE[name]
    extra = {}
    if name == "scienceqa":
        extra = {"preprocess": f"{__name__}:scienceqa_letter", "eval_target": "{{label}}",
                 "answer_regex": r"Answer:\s*([A-Z])"}
    return TaskSpec(
        name=f"trace_{name}", kind="skill", group="downstream", output_type="generate_until",
        prompt="{{prompt}}", target="{{answer}}", target_delimiter="", metric=metric, max_gen_toks=max_gen,
        until=list(until), train_steps=epochs * STEPS_PER_EPOCH, description=f"TRACE {folder} ({metric})",
        source={"type": "local", "root": "trace", "path": folder,
                "splits": {"train": "train.json", "test": "test.json"}},
        **extra,
    )


def sequences() -> list[SequenceSpec]:
    return [SequenceSpec(name="trace", tasks=[f"trace_{n}" for n in TABLE], general="trace-like",
                         description="TRACE: " + " -> ".join(v[0] for v in TABLE.values()))]


for _name in TABLE:
    TASKS.register(f"trace_{_name}", make_spec(_name), origin=f"builtin:{__name__}")
