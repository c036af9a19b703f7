"""Experience replay: the reservoir buffer after each stage, the ratio inside every batch, the general variant's
screened corpus (no general question is ever replayed), and the unchanged data order without a mixture."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark.cli import main
from benchmark.data import Example, batches, mixed_positions, mixture_rows
from methods import METHODS, Mixture, StageData, TaskInfo
from methods.replay import Row, reservoir_add
from tasks import SUITES, TASKS
from tasks.corpus import general_texts, holds_question, questions
from tests.conftest import TINY_RUN


def _rows(tag: int, n: int) -> list[Row]:
    """``n`` one-token examples whose token is ``tag * 1000 + i``: where a row came from is read off its id."""
    return [Row([tag * 1000 + i], [tag * 1000 + i]) for i in range(n)]


def _stage(method, stage: int, rows: list[Row]) -> None:
    info = TaskInfo(name=f"t{stage}", kind="skill", stage=stage, num_stages=3)
    method.on_task_start(None, info)
    method.on_stage_data(None, info, StageData(rows, lambda: [], lambda ex: {}))
    method.on_task_end(None, info)


def test_buffer_after_each_stage_is_a_reservoir_of_everything_seen():
    torch.manual_seed(0)
    method = METHODS.get("replay")(METHODS.get("replay").config_cls(buffer_size=50))
    assert method.batch_mixture() is None, "stage 1 has nothing to replay"
    _stage(method, 1, _rows(1, 30))
    assert [r.input_ids[0] for r in method.buffer] == list(range(1000, 1030)), "below capacity: everything, in order"
    _stage(method, 2, _rows(2, 70))
    assert len(method.buffer) == 50 and method.seen == 100
    assert len({r.input_ids[0] for r in method.buffer}) == 50, "no example twice"
    _stage(method, 3, _rows(3, 100))
    assert len(method.buffer) == 50 and method.seen == 200
    mixture = method.batch_mixture()
    assert mixture.fraction == 0.25 and [r.input_ids for r in mixture.pool] == [r.input_ids for r in method.buffer]


def test_reservoir_keeps_every_example_with_equal_probability():
    # Algorithm R: after 300 offers (100 per stage) each is kept with probability 30/300, so each stage holds
    # 10 of the 30 places on average; a buffer that kept only the newest, or only the first, would give 30 or 0
    torch.manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(200):
        buf, seen = [], 0
        for stage in range(3):
            seen = reservoir_add(buf, seen, _rows(stage + 1, 100), 30)
        for r in buf:
            counts[r.input_ids[0] // 1000 - 1] += 1
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02), share


def _tagged(n: int, tag: int) -> list[Example]:
    return [Example([tag, i], [tag, i]) for i in range(n)]


# (fraction, batch size, replayed rows): rounded; at least one; never the whole batch
@pytest.mark.parametrize("fraction,batch,rows", [(0.25, 8, 2), (0.25, 16, 4), (0.1, 8, 1), (0.02, 8, 1),
                                                 (0.5, 7, 4), (0.9, 4, 3)])
def test_the_replay_ratio_holds_within_every_batch(fraction, batch, rows):
    stage, pool = _tagged(20, 1), _tagged(7, 2)
    assert mixture_rows(fraction, batch) == rows
    gen = torch.Generator().manual_seed(0)
    seen_pool = []
    for b in batches(stage, batch, 12, gen, pad_id=0, mixture=Mixture(pool, fraction)):
        from_pool = (b["input_ids"][:, 0] == 2).nonzero().flatten().tolist()
        assert from_pool == mixed_positions(batch, rows), "exactly `rows` replayed rows, at their places"
        seen_pool += b["input_ids"][from_pool, 1].tolist()
    # the pool is drawn epoch by epoch: every pool example before any repeats
    assert sorted(seen_pool[:7]) == list(range(7))


def test_replayed_rows_spread_over_micro_batches():
    positions = mixed_positions(16, 4)
    assert [sum(p // 4 == m for p in positions) for m in range(4)] == [1, 1, 1, 1]  # grad_accum=4: one each


def test_without_a_mixture_the_data_order_is_the_one_before_mixtures():
    # the published records were made with this order: an empty or absent mixture must not draw differently
    examples = _tagged(11, 1)

    def before(steps, bs, gen):  # the loop as it was, copied from the commit before mixtures
        order = []
        for _ in range(steps):
            while len(order) < bs:
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[:bs], order[bs:]
            yield [examples[i].input_ids[1] for i in idx]

    for mixture in (None, Mixture([], 0.25), Mixture(_tagged(3, 2), 0.0)):
        got = [b["input_ids"][:, 1].tolist()
               for b in batches(examples, 4, 9, torch.Generator().manual_seed(3), 0, mixture)]
        assert got == list(before(9, 4, torch.Generator().manual_seed(3)))


def test_the_general_corpus_holds_no_general_question():
    suite = SUITES.get("tiny-world")
    general = [TASKS.get(n) for n in suite.tasks]
    asked = questions(general)
    kept = general_texts(suite, general)
    with open(suite.corpus_path(), encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    dropped = [t for t in corpus if t not in kept]
    assert len(asked) > 400 and 0 < len(kept) < len(corpus)
    assert not any(holds_question(t, asked) for t in kept)
    assert all(holds_question(t, asked) for t in dropped), "only texts holding a question are dropped"
    # e.g. the first test question's own fact sentence is gone
    first = TASKS.get("tw_capital").records("test")[0]
    assert not any(first["prompt"] in t for t in kept)


def test_replay_general_never_replays_a_general_question(tmp_path, cache_dir, monkeypatch):
    import benchmark.stages as stages
    from methods.replay import Replay

    encoded, screened, pools = {}, [], []
    real_texts, real_encode = stages.general_texts, stages.encode_texts

    def spy_texts(*args):
        screened.extend(real_texts(*args))
        return screened

    def spy_encode(texts, tok, max_len):
        out = real_encode(texts, tok, max_len)
        encoded.update({tuple(e.input_ids): t for e, t in zip(out, texts)})
        return out

    def spy_mixture(self):
        m = Replay.batch_mixture(self)
        pools.append(m)
        return m

    monkeypatch.setattr(stages, "general_texts", spy_texts)
    monkeypatch.setattr(stages, "encode_texts", spy_encode)
    monkeypatch.setattr(METHODS.get("replay_general"), "batch_mixture", spy_mixture)
    argv = ["-q", "run", "--methods", "replay_general", "--seeds", "0", "--output", str(tmp_path / "out"),
            "--set", "methods.replay_general.buffer_size=64"]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    (path,) = (tmp_path / "out" / "runs").glob("replay_general-*--seed0.json")  # an option set: a run id of its own
    rec = json.loads(path.read_text())
    assert rec["status"] == "success" and rec["diagnostics"][-1]["buffer_size"] == 64
    assert len(pools) == 3 and all(m is not None and len(m.pool) == 64 for m in pools), "mixed in from stage 1 on"
    asked = questions([TASKS.get(n) for n in SUITES.get("tiny-world").tasks])
    for row in pools[0].pool:
        text = encoded[tuple(row.input_ids)]  # every replayed row is an encoded text of the screened corpus
        assert text in screened and not holds_question(text, asked)


def test_replay_general_needs_a_suite_with_a_corpus(tmp_path, capsys):
    argv = ["-q", "run", "--methods", "replay_general", "--general", "commonsense", "--output", str(tmp_path / "o"),
            "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no corpus" in err[0] and "tiny-world" in err[0]


def test_bad_replay_options_are_one_line_errors(tmp_path, capsys):
    for opt, word in (("methods.replay.base=ewc", "full_ft, lora"), ("methods.replay.fraction=1.5", "[0, 1)"),
                      ("methods.replay.source=web", "tasks, general")):
        assert main(["-q", "run", "--methods", "replay", "--output", str(tmp_path / "o"), "--dry-run",
                     "--set", opt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
