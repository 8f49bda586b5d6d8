"""softtopk-bench --tag distributed (src/softtopk/bench/distributed.py): end to end at the --quick size (2 gloo
processes, n = 1e4), its JSON fields, its <!-- bench:distributed --> table, the rewrite from the JSON, and that the
default tags leave it out."""

import json

import pytest
import torch.distributed as dist

from softtopk.bench import main
from softtopk.bench.cli import parser
from softtopk.bench.distributed import DistConfig, measure

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

PAGE = """intro
<!-- bench:distributed -->
old table
<!-- /bench:distributed -->
<!-- bench:core -->
untouched
<!-- /bench:core -->
"""
HEAD = "| n | method | sharded ms | all-gather ms | ratio | sharded bytes/rank | all-gather bytes/rank |"


def test_distributed_is_not_a_default_tag():
    assert "distributed" not in parser().parse_args([]).tag
    assert parser().parse_args(["--tag", "distributed"]).tag == ["distributed"]


def test_quick_run_writes_json_and_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    page, out = tmp_path / "README.md", tmp_path / "bench"
    page.write_text(PAGE)
    assert main(["--quick", "--tag", "distributed", "--no-progress", "--out", str(out), "--write", str(page)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    part = doc["distributed"]
    assert part["setup"]["world"] == 2 and part["setup"]["sizes"] == [10**4] and part["setup"]["backend"] == "gloo"
    assert [(r["n"], r["method"]) for r in part["rows"]] == [(10**4, "sigmoid"), (10**4, "dftopk")]
    m = 10**4 // 2
    for r in part["rows"]:
        assert r["sharded_ms"] > 0 and r["allgather_ms"] > 0 and len(r["sharded_ms_all"]) == r["rounds"] == 3
        assert r["ratio"] == pytest.approx(r["sharded_ms"] / r["allgather_ms"])
        assert r["allgather_bytes"] == 4 * m * 4  # this rank's (rows, n / world) float32 shard
        assert 0 < r["sharded_bytes"] < r["allgather_bytes"]
        assert r["max_abs_diff_mask"] < 1e-5 and r["max_abs_diff_grad"] < 1e-5 * max(1.0, r["max_abs_grad"])
    # dftopk: the shard description (12 int64), the local top k + 1 values (float32) and indices (int64) of the 4
    # rows, then one float32 sum per row in the backward: 4 collectives
    dftopk = part["rows"][1]
    assert (dftopk["sharded_bytes"], dftopk["sharded_calls"]) == (12 * 8 + 4 * 101 * (4 + 8) + 4 * 4, 4)
    text = page.read_text()
    assert HEAD in text and "old table" not in text and "untouched" in text
    assert "| 1e4 | sigmoid |" in text and "| 1e4 | dftopk |" in text and "2 gloo processes" in text
    assert "## distributed" in printed and "section core left as it was" in printed
    page.write_text(PAGE)
    assert main(["--from-json", str(out / "results.json"), "--write", str(page), "--no-files"]) == 0
    assert page.read_text() == text


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of world"):
        measure(DistConfig(world=4, sizes=(10**4 + 2,)))
