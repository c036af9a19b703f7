"""``--shard K/N``: the shards of a sweep together give exactly the unsharded sweep's rows."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.errors import UserError
from benchmark.shard import parse_shard, shard_slice
from tests.conftest import TINY_RUN


def test_round_robin_slices_partition_the_plan():
    plan = [(m, s) for m in ["a", "b", "c"] for s in [0, 1]]
    shards = [shard_slice(plan, f"{k}/4") for k in range(1, 5)]
    assert shards[0] == [("a", 0), ("c", 0)] and shards[3] == [("b", 1)]
    assert sorted(x for sh in shards for x in sh) == sorted(plan)
    assert shard_slice(plan, None) == plan and shard_slice(plan, " 1 / 1 ") == plan


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1/0", "1", "a/b", "1/2/3", "-1/2", ""])
def test_bad_shard_is_a_one_line_error(bad, tmp_path, capsys):
    with pytest.raises(UserError):
        parse_shard(bad)
    assert main(["run", f"--shard={bad}", "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid shard") and "\n" not in err
    assert not (tmp_path / "o").exists()


def _sweep(out, shard=None):
    argv = ["-q", "run", "--sequence", "tw-shard-test", "--methods", "full_ft,lora", "--seeds", "0",
            "--output", str(out)]
    if shard:
        argv += ["--shard", shard]
    for s in TINY_RUN:
        argv += ["--set", s]
    return main(argv)


@pytest.mark.slow
def test_shards_together_give_the_unsharded_rows(tmp_path, cache_dir):
    from tasks import SEQUENCES, SequenceSpec

    tw = SEQUENCES.get("tiny-world")  # one tiny-world stage keeps the four runs quick
    with SEQUENCES.registered("tw-shard-test", SequenceSpec(name="tw-shard-test", tasks=["tw_sentiment"],
                                                            general=tw.general)):
        assert _sweep(tmp_path / "all") == 0
        assert _sweep(tmp_path / "s1", "1/2") == 0
        assert _sweep(tmp_path / "s2", "2/2") == 0
    assert [p.name.split("--")[0] for p in (tmp_path / "s1" / "runs").glob("*.json")] == ["full_ft"]
    assert [p.name.split("--")[0] for p in (tmp_path / "s2" / "runs").glob("*.json")] == ["lora"]
    assert main(["-q", "leaderboard", "--results", str(tmp_path / "s1"), str(tmp_path / "s2"),
                 "--output", str(tmp_path / "merged")]) == 0

    def rows(d):
        df = pd.read_csv(d / "scores.csv")
        return set(map(tuple, df.astype(str).itertuples(index=False)))

    assert rows(tmp_path / "merged") == rows(tmp_path / "all")
    assert len(rows(tmp_path / "all")) == 2 * 2 * (1 + 4)  # runs x (base + 1 stage) x (downstream + general)
