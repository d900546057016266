"""``python -m bench.cuda_resident`` prints the resident kernel's predictions without a GPU; --measure needs one."""
import pytest
import torch

from bench import cuda_resident


def test_predictions_cover_the_layers_the_kernel_takes(capsys):
    assert cuda_resident.main([]) == 0
    rows = cuda_resident.predicted_rows()
    assert {(r["device"], r["n"], r["nblocks"], r["T"]) for r in rows} == {
        (d, n, nb, T) for d in ("H100 SXM", "H200") for n, nb in cuda_resident.LAYERS for T in cuda_resident.TOKENS}
    # x and the output once: never faster than HBM allows, and no FLOP beyond the useful ones at whole tiles
    assert all(0 < r["hbm_bw_share"] <= 0.9 and r["flops_executed_per_useful"] == 1.0 for r in rows)
    assert "x_dense" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_measure_needs_a_gpu(capsys):
    assert cuda_resident.main(["--measure"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
