"""Bad input is caught before any work: one line naming the bad value, exit code 2, no traceback, and the
results directory (which already holds a finished run) is left exactly as it was. Plus: nothing unsafe loads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
SETS = [a for s in TINY_RUN for a in ("--set", s)]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results directory holding a finished lora run and an unfinished full_ft one (TINY_RUN settings)."""
    import torch

    from benchmark import checkpoint
    from benchmark.config import make_config
    from benchmark.paths import checkpoint_dir
    from benchmark.plan import make_plan, method_runs, run_inputs
    from benchmark.records import write_record
    from benchmark.stages import new_record

    out = tmp_path_factory.mktemp("results")
    plan = make_plan(make_config({"output": str(out), "methods": ["full_ft", "lora"]}, TINY_RUN))
    full_ft, lora = (r for r in method_runs(plan) if r.seed == 0)
    rec = new_record(plan, lora)
    rec.status, rec.failed_stage, rec.R, rec.G = "success", None, [[0.0] * 3] * 4, [[25.0] * 4] * 4
    write_record(out / "runs" / f"{rec.run_id}.json", rec)
    (out / "leaderboard.md").write_text("| method |\n|---|\n| lora |\n")
    # and an unfinished full_ft run, checkpointed after stage 1 with one torch thread
    ck = checkpoint.save_stage(checkpoint_dir(out, full_ft.run_id), 1, {"w": torch.zeros(2)}, None,
                               {"inputs": run_inputs(plan, full_ft), "record": {}})
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "torch_threads": 1}))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad config files, model folders and task data, registered as tasks and sequences for the test."""
    from tasks import SEQUENCES, TASKS
    from tasks.base import GeneralSuite, SequenceSpec, TaskSpec
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.yaml").write_text("methods: [lora\n")
    (d / "typo.yaml").write_text("modell:\n  name: tiny-world\n")
    (d / "latin1.yaml").write_bytes("methods: [lora]\n# r\xe9sum\xe9\n".encode("latin-1"))
    (d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (d / "nul.yaml").write_bytes(b"methods: [lora]\n\x00\x01\x02\n")
    # an option typo in the file must not vanish because --methods picks the method
    (d / "lora_typo.yaml").write_text("methods:\n  lora:\n    rank: 16\n")
    (d / "no_config_model").mkdir()
    (d / "custom_code_model").mkdir()  # asks for code from its repository (never run without the flag)
    (d / "custom_code_model" / "config.json").write_text(json.dumps(
        {"model_type": "fb_custom", "auto_map": {"AutoConfig": "configuration_fb.FbConfig",
                                                 "AutoModelForCausalLM": "modeling_fb.FbModel"}}))
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(d / "llama_model")  # config.json only
    mc = '{"prompt": "Q", "choices": ["a", "b", "c", "d"], "label": %s}\n'
    (d / "empty.jsonl").write_text("")
    (d / "mc_out_of_range.jsonl").write_text(mc % 1 + mc % 7)
    (d / "gen_empty_target.jsonl").write_text('{"prompt": "1+1=", "target": "2"}\n{"prompt": "2+2=", "target": ""}\n')
    (d / "bad_json.jsonl").write_text('{"prompt": "1+1=", "target": "2"}\n{"prompt": "2+2=", "target": \n')
    general = dict(group="general", output_type="multiple_choice", choices="choices", target="{{label}}",
                   metric="acc")
    specs = {
        "bad_missing_file": TaskSpec(name="bad_missing_file", data={"test": str(d / "nope.jsonl")}, **general),
        "bad_empty_split": TaskSpec(name="bad_empty_split", data={"test": str(d / "empty.jsonl")}, **general),
        "bad_mc_target": TaskSpec(name="bad_mc_target", data={"test": str(d / "mc_out_of_range.jsonl")}, **general),
        "bad_gen_target": TaskSpec(name="bad_gen_target", data={"train": str(d / "gen_empty_target.jsonl"),
                                                                "test": str(d / "gen_empty_target.jsonl")}),
        "bad_json_line": TaskSpec(name="bad_json_line", data={"train": str(d / "bad_json.jsonl"),
                                                              "test": str(d / "bad_json.jsonl")}),
    }
    for name, spec in specs.items():
        TASKS.register(name, spec, origin="test")
        down, gen = ([name], []) if spec.group == "downstream" else (["tw_add"], [name])
        seq = name.replace("_", "-")
        SEQUENCES.register(seq, SequenceSpec(name=seq, tasks=down, general=GeneralSuite(tasks=gen)), origin="test")
    yield d
    for name in specs:
        TASKS.unregister(name)
        SEQUENCES.unregister(name.replace("_", "-"))


# (case id, extra argv, text the one-line error must contain); ``{d}`` is the folder of bad inputs
CASES = [
    ("unknown method", ["--methods", "nope"], "'nope'"),
    ("method typo", ["--methods", "loar"], "did you mean 'lora'"),
    ("unknown sequence", ["--sequence", "tiny-wrld"], "did you mean 'tiny-world'"),
    ("path-like sequence", ["--sequence", "../../x"], "'../../x'"),
    ("unknown config key", ["--set", "train.lrr=1"], "did you mean 'train.lr'"),
    ("unknown method option", ["--set", "methods.lora.rank=4"], "'methods.lora.rank'"),
    ("option of unknown method", ["--set", "methods.lorra.r=4"], "'lorra'"),
    ("wrong type int", ["--set", "train.batch_size=abc"], "train.batch_size: 'abc'"),
    ("wrong type float", ["--set", "train.lr=fast"], "train.lr: 'fast'"),
    ("negative lr", ["--set", "train.lr=-1"], "train.lr: -1"),
    ("lora rank 0", ["--set", "methods.lora.r=0"], "Invalid r: 0"),
    ("dropout out of range", ["--set", "methods.lora.dropout=1.5"], "dropout: 1.5"),
    ("odd LoRAMoE experts", ["--methods", "loramoe", "--set", "methods.loramoe.n_experts=3"], "n_experts: 3"),
    ("bad scheduler", ["--set", "train.scheduler=cosin"], "'cosin'"),
    ("bad dtype", ["--set", "model.dtype=fp8"], "'fp8'"),
    ("seeds not integers", ["--seeds", "a,b"], "'a,b'"),
    ("negative seed", ["--seeds=-1"], "seed: -1"),
    ("limit 0", ["--set", "eval.limit=0"], "eval.limit: 0"),
    ("bad log_samples", ["--set", "eval.log_samples=some"], "eval.log_samples: 'some'; valid: local, all, none"),
    ("zero threads", ["--set", "num_threads=0"], "num_threads: 0"),
    ("unknown flag", ["--bogus"], "--bogus"),
    ("missing config file", ["--config", "/nonexistent/x.yaml"], "'/nonexistent/x.yaml'"),
    ("invalid YAML", ["--config", "{d}/bad.yaml"], "invalid YAML"),
    ("config key typo", ["--config", "{d}/typo.yaml"], "did you mean 'model'"),
    ("non-UTF-8 config", ["--config", "{d}/latin1.yaml"], "latin1.yaml' is not UTF-8 text (byte 0xe9"),
    ("binary config", ["--config", "{d}/binary.yaml"], "binary.yaml' is not UTF-8 text (byte 0x89"),
    ("config with control bytes", ["--config", "{d}/nul.yaml"], "invalid YAML"),
    ("config method option kept under --methods", ["--config", "{d}/lora_typo.yaml", "--methods", "lora"],
     "'methods.lora.rank'"),
    ("unknown precision", ["--set", "train.precision=fp16"], "'fp16'; valid: auto, bf16-mixed, bf16, fp32"),
    ("precision contradicts dtype", ["--set", "train.precision=fp32", "--set", "model.dtype=bfloat16"],
     "model.dtype=bfloat16 contradicts train.precision=fp32"),
    ("model path missing", ["--model", "./no/such/model"], "'./no/such/model'"),
    ("model path escaping", ["--model", "../../x"], "'../../x'"),
    ("model dir without config", ["--model", "{d}/no_config_model"], "no config.json"),
    ("model needs remote code", ["--model", "{d}/custom_code_model"], "--trust-remote-code"),
    ("lora target absent (tiny-world)", ["--methods", "lora", "--set", "methods.lora.target_modules=[c_attn]"],
     "['c_attn']"),
    ("lora target absent (local model)", ["--model", "{d}/llama_model", "--methods", "lora", "--set",
                                          "methods.lora.target_modules=[query_key_value]"], "['query_key_value']"),
    ("LoRAMoE target absent", ["--methods", "loramoe", "--set", "methods.loramoe.target_modules=[fc1]"], "['fc1']"),
    ("missing data file", ["--sequence", "bad-missing-file"], "nope.jsonl"),
    ("empty split", ["--sequence", "bad-empty-split"], "test split is empty"),
    ("target not among choices", ["--sequence", "bad-mc-target"], "target index 7"),
    ("empty generative target", ["--sequence", "bad-gen-target"], "empty target ''"),
    ("broken JSON line", ["--sequence", "bad-json-line"], "line 2"),
    ("finished run, other settings", ["--methods", "lora", "--set", "train.lr=0.5"], "train.lr: 0.001 -> 0.5"),
    ("checkpoint, other settings", ["--methods", "full_ft", "--set", "train.batch_size=4"],
     "checkpoint of run full_ft--tiny-world--tiny-world--seed0 was made with other settings "
     "(train.batch_size: 8 -> 4)"),
    ("checkpoint, other thread count", ["--methods", "full_ft", "--set", "num_threads=2"],
     "num_threads=2 but the checkpoint was made with 1 torch thread(s)"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_results_untouched(argv, needle, results, files, capsys):
    argv = [a.replace("{d}", str(files)) for a in argv]
    before = _snapshot(results)
    rc = main(["run", "--output", str(results), *SETS, *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    assert _snapshot(results) == before, "a rejected command changed the results directory"


def test_output_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert main(["run", "--output", str(f), *SETS]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and str(f) in err and err.count("\n") == 1
    assert f.read_text() == "keep me"


def test_bad_input_in_a_subprocess(results):
    before = _snapshot(results)
    p = subprocess.run([sys.executable, "-m", "benchmark", "run", "--output", str(results), "--methods", "lora",
                        "--set", "methods.lora.target_modules=[c_attn]"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: methods.lora: ") and "c_attn" in p.stderr
    assert _snapshot(results) == before


# -- names from configs stay inside the output directory ----------------------------------------------------
def test_names_cannot_escape_the_output_directory(tmp_path):
    from benchmark.paths import checkpoint_dir, lock_path, record_path, safe_component, under
    from methods import METHODS

    assert "/" not in safe_component("../../x") and not safe_component("../../x").startswith(".")
    out = tmp_path / "out"
    for path in (record_path(out, "../../x"), checkpoint_dir(out, "../../x"), lock_path(out, "/etc/passwd")):
        assert path.resolve().is_relative_to(out.resolve()), path
    with pytest.raises(ValueError, match="escapes"):
        under(out, "..", "x")
    with pytest.raises(ValueError, match="invalid method name"):
        METHODS.register("../../x", object)


def test_run_id_of_a_path_like_model_name_is_one_file_name(tmp_path):
    from benchmark.config import make_config
    from benchmark.paths import record_path
    from benchmark.plan import make_plan, run_id

    model = tmp_path / "weird" / ".." / "my model"
    model.mkdir(parents=True)
    plan = make_plan(make_config({"model": {"name": str(model)}, "output": str(tmp_path / "out")}, []))
    rid = run_id(plan, "lora", 0)
    assert "/" not in rid and " " not in rid and not rid.startswith(".")
    assert record_path(tmp_path / "out", rid).parent == tmp_path / "out" / "runs"


# -- nothing unsafe is loaded -------------------------------------------------------------------------------
UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b", re.M), "pickle-based loading"),
    (re.compile(r"yaml\.(load|unsafe_load|full_load)\(|Loader\s*=\s*yaml\.(Unsafe)?Loader"), "YAML without safe_load"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code forced on"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec of text"),
]


def test_no_unsafe_loading_in_the_code():
    offenders = []
    for folder in ("benchmark", "methods", "tasks", "scripts"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            offenders += [f"{f.relative_to(ROOT)}: {why}" for rx, why in UNSAFE if rx.search(text)]
    assert not offenders, offenders


def test_config_file_method_options_survive_methods_flag(tmp_path):
    """``--config`` with ``methods: {lora: {r: 16}, full_ft: {}}`` plus ``--methods lora`` runs lora with r 16."""
    from benchmark.cli import build_parser, run_config

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("methods:\n  lora:\n    r: 16\n  full_ft: {}\ntrain:\n  lr: 0.002\n")
    cfg = run_config(build_parser().parse_args(["run", "--config", str(cfg_file), "--methods", "lora"]))
    assert cfg.methods == ["lora"]
    assert cfg.method_options["lora"] == {"r": 16} and cfg.train.lr == 0.002
    # --set still wins over the file
    cfg = run_config(build_parser().parse_args(["run", "--config", str(cfg_file), "--methods", "lora", "--set",
                                                "methods.lora.r=4"]))
    assert cfg.method_options["lora"]["r"] == 4
