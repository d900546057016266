"""``python -m bench.cuda_decode`` prints the decode predictions without a GPU; --measure needs one."""
import pytest
import torch

from bench import cuda_decode


def test_predictions_cover_the_target_grid(capsys):
    assert cuda_decode.main([]) == 0
    rows = cuda_decode.predicted_rows()
    assert {(r["n"], r["T"]) for r in rows} == {(n, T) for n in (2048, 4096, 8192) for T in (1, 4, 16)}
    assert all(r["vs_floor"] >= 1 and r["cuda_us"] >= r["floor_us"] for r in rows)  # nothing beats the floor
    assert "x_dense" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_measure_needs_a_gpu(capsys):
    assert cuda_decode.main(["--measure"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
