"""The CUDA ``auto`` rule: the cost model's fastest backend, the torch reference always in the comparison."""
import math

import torch

from monarch_kernels import cost_model as cm
from monarch_kernels import gpu_dispatch as gd
from monarch_kernels.builtin import _triton_prefers


def test_triton_wins_where_the_model_says_so_and_never_loses_to_the_reference():
    for dims in [(16384, 4096, 4096, 64), (16384, 1024, 1024, 32), (16, 2048, 2048, 64), (None, 1024, 1024, 32)]:
        t = gd.predicted_seconds("triton", "monarch", "bfloat16", dims)
        r = gd.predicted_seconds("torch", "monarch", "bfloat16", dims)
        assert t < r, dims
        assert gd.fastest("monarch", torch.bfloat16, dims, ["triton", "torch"]) == "triton"
    # one 768 -> 3072 block: a compute-bound GEMM where cuBLAS (the reference's bmm) is predicted faster
    dims = (16384, 768, 3072, 768)
    assert gd.predicted_seconds("torch", "blockdiag", "bfloat16", dims) < gd.predicted_seconds(
        "triton", "blockdiag", "bfloat16", dims)
    assert not gd.prefers("triton", "blockdiag", torch.bfloat16, dims)


def test_unpriced_dtype_or_backend_falls_back_to_torch():
    assert gd.fastest("monarch", torch.float64, (64, 64, 64, 8), ["triton", "torch"]) == "torch"
    assert math.isinf(gd.predicted_seconds("nobody", "monarch", "bfloat16", (64, 64, 64, 8)))


def test_a_faster_registered_backend_takes_over():
    fast = cm.Cost([cm.Kernel("fake", 0.0, 0.0, 0.0, 0.0, 1.0)])
    cm.register_estimator("fakecuda", "decode", lambda op, problem, dtype, dev: fast)
    gd.predicted_seconds.cache_clear()
    try:
        dims = (8, 4096, 4096, 64)
        assert not gd.prefers("triton", "monarch", torch.bfloat16, dims, others=["fakecuda"])
        assert gd.prefers("fakecuda", "monarch", torch.bfloat16, dims, others=["triton"])
    finally:
        del cm._ESTIMATORS[("fakecuda", "decode")]
        gd.predicted_seconds.cache_clear()


def test_blockdiag_training_calls_are_priced_by_forward_and_backward():
    """A block-diagonal call with 4 blocks of 1024 at 16 tokens: the forward is weight-bound on both sides (a
    tie keeps Triton, listed first), but the training step adds dx (the grouped kernel on transposed weights)
    and dw (the split-T weight-gradient kernel with its fp32 partial sum), which lose to two cuBLAS ``bmm``."""
    dims = (16, 4096, 4096, 1024)
    assert gd.prefers("triton", "blockdiag", torch.bfloat16, dims)
    assert not gd.prefers("triton", "blockdiag", torch.bfloat16, dims, training=True)
    step = cm.blockdiag_cost("triton", 16, 4, 1024, 1024, training=True)
    assert [k.name for k in step.kernels] == ["blockdiag", "blockdiag dx", "blockdiag dw", "blockdiag dw partial sum"]
    ref = cm.blockdiag_cost("torch", 16, 4, 1024, 1024, training=True)
    assert [k.name for k in ref.kernels] == ["ref bmm", "ref dx bmm", "ref dw bmm"]  # no copies at full width
    assert cm.blockdiag_cost("cuda", 16, 4, 1024, 1024) is None
    assert math.isinf(cm.blockdiag_seconds("cuda", 16, 4, 1024, 1024))


def test_auto_never_takes_the_interpreter():
    assert not _triton_prefers("monarch", torch.device("cpu"), torch.float32, (64, 64, 64, 8))


def test_training_calls_are_priced_by_forward_and_backward():
    """2048 wide with 4 blocks of 512 at 2048 tokens: the torch reference is predicted to win the forward (one
    ``bmm`` per stage against Triton's tiles, capped by four interleaved blocks) but to lose the training step
    (Triton's backward runs its block GEMMs as cuBLAS ``bmm`` on strided views, without the reference's
    permutation copies); ``auto`` follows the call's kind."""
    dims = (2048, 2048, 2048, 512)
    assert not gd.prefers("triton", "monarch", torch.bfloat16, dims)
    assert gd.prefers("triton", "monarch", torch.bfloat16, dims, training=True)
    assert gd.predicted_seconds("triton", "monarch", "bfloat16", dims, True) > gd.predicted_seconds(
        "triton", "monarch", "bfloat16", dims)
    # 4096 wide with 64 blocks: Triton wins both
    square = (4096, 4096, 4096, 64)
    assert gd.prefers("triton", "monarch", torch.bfloat16, square, training=True)
