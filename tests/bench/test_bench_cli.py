"""The benchmark CLI runs, prints its table and writes results.json and a plot."""
import json

import pytest
import torch

from bench.__main__ import main
from bench.ops import Problem


def test_cli_small_sweep(tmp_path, capsys):
    rc = main(["--shapes", "8:32:48:4,4:64:4", "--budget", "0.01", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "T=8 32->48 nb=4" in out and "x dense" in out
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {r["impl"] for r in rows} >= {"dense", "torch"}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    assert all(r["us"] > 0 and r["gbs"] > 0 for r in rows)
    assert data["meta"]["device"]
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--shapes", "8:32", "--budget", "0.01"]) == 2
    assert "expected T:n_in:n_out:nblocks" in capsys.readouterr().err
    assert main(["--modes", "sideways"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_without_cuda():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["--device", "cuda", "--quick"])


def test_problem_parse():
    assert Problem.parse("16:2048:16") == Problem(16, 2048, 2048, 16)
    assert Problem.parse("16:768:3072:4").label == "T=16 768->3072 nb=4"


def test_reference_table_small(tmp_path, capsys):
    """bench.reference_table prints one row per (shape, mode) with the cpu-vs-torch ratio and, given an external
    baseline file, its ratios too."""
    from bench.reference_table import main as table

    base = tmp_path / "base.py"
    base.write_text("import torch\n\ndef dense_like(x, w1, w2):\n    return x * 1.0\n")
    assert table(["--shapes", "8:16:4,1:32:2", "--rounds", "1", "--baseline", f"{base}:dense_like"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines[2:]]
    assert [r[:4] for r in rows] == [["8", "16", "4", "fwd"], ["8", "16", "4", "fwdbwd"],
                                     ["1", "32", "2", "fwd"], ["1", "32", "2", "fwdbwd"]]
    assert all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows)
    assert "torch vs base" in lines[1]


def test_reference_table_rejects_bad_shapes(capsys):
    from bench.reference_table import main as table

    with pytest.raises(SystemExit):
        table(["--shapes", "8:15:4"])
    assert "nblocks dividing n" in capsys.readouterr().err
