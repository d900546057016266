"""The CUDA ``auto`` rule: the cost model's fastest backend, the torch reference always in the comparison."""
import dataclasses
import math

import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import cost_model as cm
from monarch_kernels import gpu_dispatch as gd
from monarch_kernels.builtin import _triton_prefers


def test_triton_wins_where_the_model_says_so_and_never_loses_to_the_reference():
    for dims in [(16384, 4096, 4096, 64), (16384, 1024, 1024, 32), (16, 2048, 2048, 64), (None, 1024, 1024, 32)]:
        t = gd.predicted_seconds("triton", "monarch", "bfloat16", dims)
        r = gd.predicted_seconds("torch", "monarch", "bfloat16", dims)
        assert t < r, dims
        assert gd.fastest("monarch", torch.bfloat16, dims, ["triton", "torch"], eager=False) == "triton"
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
    """8192 wide with 2 blocks of 4096 at 8192 tokens: the torch reference is predicted to win the forward (one
    cuBLAS ``bmm`` per stage of wide blocks against Triton's tiles, which re-read the input from L2 for each of
    the 32 N tiles of a 4096-wide block) but to lose the training step (Triton's backward runs its block GEMMs
    as cuBLAS ``bmm`` on strided views, without the reference's permutation copies); ``auto`` follows the
    call's kind."""
    dims = (8192, 8192, 8192, 4096)
    assert not gd.prefers("triton", "monarch", torch.bfloat16, dims, eager=False)
    assert gd.prefers("triton", "monarch", torch.bfloat16, dims, training=True, eager=False)
    assert gd.predicted_seconds("triton", "monarch", "bfloat16", dims, True) > gd.predicted_seconds(
        "triton", "monarch", "bfloat16", dims)
    # 4096 wide with 64 blocks: Triton wins both
    square = (4096, 4096, 4096, 64)
    assert gd.prefers("triton", "monarch", torch.bfloat16, square, training=True, eager=False)


def test_a_fused_activation_is_priced():
    """The activation fused into a call reaches the rule (``backends.Dims``): 2048 wide with 2 blocks of 1024 at
    2048 tokens, a training call with a fused GELU is priced higher than without one on both backends (the
    reference applies and differentiates it in extra passes, Triton in its epilogues and the derivative's
    pass), at the cost model's prices for that activation. A plain tuple carries none."""
    from monarch_kernels import backends

    sh = mk.monarch_factor_shapes(2048, 2048, 2)
    dims = (2048, 2048, 2048, max(sh.p, sh.q, sh.r, sh.s))
    gelu = backends.Dims(dims, "gelu")
    assert gelu == dims and gelu.activation == "gelu" and backends.activation_of(dims) == "none"
    problem = dataclasses.replace(cm.Problem.linear(2048, 2048, 2048, 2), activation="gelu")
    for backend, path in (("torch", "reference"), ("triton", cm.triton_path(problem))):
        priced = gd.predicted_seconds(backend, "monarch", "bfloat16", dims, True, "gelu")
        assert priced == pytest.approx(cm.estimate(backend, path, "fwdbwd", problem, "bfloat16").time())
        assert priced > gd.predicted_seconds(backend, "monarch", "bfloat16", dims, True)
    extra = {b: gd.predicted_seconds(b, "monarch", "bfloat16", dims, True, "gelu")
             - gd.predicted_seconds(b, "monarch", "bfloat16", dims, True) for b in ("torch", "triton")}
    assert extra["torch"] > extra["triton"]  # the reference's GELU passes cost more than the fused epilogue


def test_ops_pass_their_activation_and_bias_to_the_dispatcher(monkeypatch):
    """``monarch_linear``, ``blockdiag_linear``, ``monarch_mlp`` (its layers) and ``resolve_backend`` hand the
    fused activation and whether there is a bias to the rules (``Dims``); ``resolve_backend`` takes the call's
    bias (a truncated one: the call's ``out_features``) and refuses an unknown activation or a bias of the
    wrong shape, as the ops do."""
    from monarch_kernels import backends

    seen = []
    real = backends._resolve
    monkeypatch.setattr(backends, "_resolve", lambda *a: seen.append((a[3][2], a[6], a[7])) or real(*a))
    sh = mk.monarch_factor_shapes(64, 64, 4)
    x, w1, w2 = torch.randn(5, 64), torch.randn(*sh.w1_shape), torch.randn(*sh.w2_shape)
    b = torch.randn(64)
    mk.monarch_linear(x, w1, w2, activation="gelu")
    mk.blockdiag_linear(x, w1, b, activation="relu")
    mk.monarch_linear(x, w1, w2, b)
    mk.monarch_mlp(x, w1, w2, w1, w2, None, b)
    assert mk.resolve_backend("monarch", x, w1, w2, activation="gelu_tanh") in ("torch", "cpu")
    assert mk.resolve_backend("monarch", x, w1, w2, bias=b[:40]) in ("torch", "cpu")
    assert mk.resolve_backend("blockdiag", x, w1, bias=b) in ("torch", "cpu")
    assert seen == [(64, "gelu", False), (64, "relu", True), (64, "none", True), (64, "gelu", False),
                    (64, "none", True), (64, "gelu_tanh", False), (40, "none", True), (64, "none", True)]
    with pytest.raises(ValueError, match="activation"):
        mk.resolve_backend("monarch", x, w1, w2, activation="swish")
    for bad in (torch.randn(65), torch.randn(2, 32), torch.randn(64, dtype=torch.float64)):
        with pytest.raises((ValueError, TypeError), match="bias"):
            mk.resolve_backend("monarch", x, w1, w2, bias=bad)


def test_a_bias_is_priced_in_training_calls_only():
    """``Dims.bias`` reaches the prices: a training call with a bias costs its gradient on top (dense-like
    ``g.sum(0)`` for the reference, the copy's column sums for Triton at 4096/64), a forward the same; a plain
    tuple carries none."""
    from monarch_kernels import backends

    dims = (16384, 4096, 4096, 64)
    assert backends.bias_of(dims) is False and backends.Dims(dims, "none", True).bias is True
    for backend, path in (("torch", "reference"), ("triton", "two_kernel")):
        problem = cm.Problem.linear(16384, 4096, 4096, 64, bias=True)
        priced = gd.predicted_seconds(backend, "monarch", "bfloat16", dims, True, "none", True)
        assert priced == pytest.approx(cm.estimate(backend, path, "fwdbwd", problem, "bfloat16").time())
        assert priced > gd.predicted_seconds(backend, "monarch", "bfloat16", dims, True)
        assert (gd.predicted_seconds(backend, "monarch", "bfloat16", dims, False, "none", True)
                == gd.predicted_seconds(backend, "monarch", "bfloat16", dims))
        assert (gd.predicted_seconds(backend, "blockdiag", "bfloat16", dims, True, "none", True)
                > gd.predicted_seconds(backend, "blockdiag", "bfloat16", dims, True))


def test_the_rule_prices_at_the_current_gpus_constants(monkeypatch):
    """On an H200 the rule uses its measured constants (4.25 TB/s); without a GPU, the H100's."""
    from monarch_kernels import cost_model as cm

    gd.device.cache_clear()
    gd.predicted_seconds.cache_clear()
    try:
        assert gd.device() is cm.H100_SXM or torch.cuda.is_available()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
        gd.device.cache_clear()
        assert gd.device() is cm.H200
        dims = (16384, 4096, 4096, 64)
        h200 = gd.predicted_seconds("torch", "monarch", "bfloat16", dims)
        problem = cm.Problem.linear(16384, 4096, 4096, 64)
        assert h200 == pytest.approx(cm.estimate("torch", "reference", "fwd", problem, dev=cm.H200).time(cm.H200))
        assert h200 < cm.estimate("torch", "reference", "fwd", problem).time(cm.H100_SXM)
    finally:
        gd.device.cache_clear()
        gd.predicted_seconds.cache_clear()


def test_eager_calls_pay_the_measured_host_time():
    """Eager, a call costs at least its backend's host time (measured: Triton ~357 µs per forward, the
    reference 154): 16 tokens of 2048/64 — a few µs of device work for either — go to the reference, which
    the device model alone would not pick; 16384 tokens of 4096/64 (the reference's device time, ~0.8 ms, is
    above both host times) stay with Triton; a call captured into a CUDA graph pays no host time."""
    small, large = (16, 2048, 2048, 64), (16384, 4096, 4096, 64)
    assert gd.fastest("monarch", torch.bfloat16, small, ["triton", "torch"], eager=False) == "triton"
    assert gd.fastest("monarch", torch.bfloat16, small, ["triton", "torch"], eager=True) == "torch"
    assert gd.call_seconds("triton", "monarch", "bfloat16", small) == gd.HOST_S[("triton", False)]
    assert gd.fastest("monarch", torch.bfloat16, large, ["triton", "torch"], eager=True) == "triton"
    assert gd.call_seconds("torch", "monarch", "bfloat16", large) == gd.predicted_seconds(
        "torch", "monarch", "bfloat16", large)
    # training calls by the forward-plus-backward host times; block-diagonal calls by device time alone
    assert gd.call_seconds("triton", "monarch", "bfloat16", small, training=True) == gd.HOST_S[("triton", True)]
    bd = (16, 4096, 4096, 1024)
    assert gd.call_seconds("triton", "blockdiag", "bfloat16", bd) == gd.predicted_seconds(
        "triton", "blockdiag", "bfloat16", bd)
    # the default follows the stream: not capturing here; while a graph is captured, device time alone
    assert not gd.capturing()
    assert gd.fastest("monarch", torch.bfloat16, small, ["triton", "torch"]) == "torch"


def test_calls_captured_into_a_cuda_graph_pay_no_host_time(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    gd.device.cache_clear()
    try:
        assert gd.capturing()
        assert gd.fastest("monarch", torch.bfloat16, (16, 2048, 2048, 64), ["triton", "torch"]) == "triton"
    finally:
        gd.device.cache_clear()


def test_auto_fuses_the_mlp_where_the_model_prices_it_below_the_layers():
    """GPT-2's MLP (768 -> 3072 -> 768, 4 blocks, GELU): from a CUDA graph (device time alone) the fused hidden
    layer beats the two Triton layers at 16K tokens; eager, its host time (two Triton forwards' worth) loses to
    the layers at 16K tokens (the reference's short host time takes fc2) and wins at 64K; pairs the fused kernel
    does not take, and fp32, never."""
    def problems(T):
        return cm.Problem.linear(T, 768, 3072, 4, "gelu"), cm.Problem.linear(T, 3072, 768, 4)

    fc1, fc2 = problems(16384)
    assert gd.fused_mlp_wins(fc1, fc2, torch.bfloat16, ("triton", "triton"), eager=False)
    assert not gd.fused_mlp_wins(fc1, fc2, torch.bfloat16, ("triton", "torch"), eager=True)
    fused = cm.mlp_forward(fc1, fc2, "bfloat16", gd.device()).time(gd.device())
    assert fused < 2 * gd.HOST_S[("triton", False)]  # eager: host-bound at 16K tokens
    assert gd.fused_mlp_wins(*problems(65536), torch.bfloat16, ("triton", "triton"), eager=True)
    assert not gd.fused_mlp_wins(fc1, fc2, torch.float32, ("triton", "triton"), eager=False)
    odd = cm.Problem.linear(16384, 64, 96, 4), cm.Problem.linear(16384, 96, 64, 16)  # p2 % l1 != 0
    assert not gd.fused_mlp_wins(*odd, torch.bfloat16, ("torch", "torch"), eager=False)


def test_auto_fuses_the_mlp_training_step_where_the_model_prices_it_below_the_layers():
    """Training calls (``training=True``): GPT-2's MLP from a CUDA graph fuses at 16K tokens (the fused step
    against the two Triton layers' steps plus the GELU derivative's pass between them); eager, two Triton
    training calls' host time loses to the reference layers at 16K tokens and wins at 64K; a pair whose fc1
    rank the backward kernel does not take (r1 = 320: five 64-wide chunks) never, though its forward fuses."""
    from monarch_kernels.shapes import MonarchShape

    def problems(T):
        return cm.Problem.linear(T, 768, 3072, 4, "gelu"), cm.Problem.linear(T, 3072, 768, 4)

    dev = gd.device()
    fc1, fc2 = problems(16384)
    assert gd.fused_mlp_wins(fc1, fc2, torch.bfloat16, ("triton", "triton"), eager=False, training=True)
    layers = (sum(cm.estimate("triton", cm.triton_path(p, dev=dev), "fwdbwd", p, "bfloat16", dev).time(dev)
                  for p in (fc1, fc2)) + cm.activation_pass(16384, 3072, "bfloat16", dev, backward=True).time(dev))
    assert cm.mlp_training_step(fc1, fc2, "bfloat16", dev).time(dev) < 0.7 * layers
    assert not gd.fused_mlp_wins(fc1, fc2, torch.bfloat16, ("torch", "torch"), eager=True, training=True)
    assert gd.fused_mlp_wins(*problems(65536), torch.bfloat16, ("torch", "torch"), eager=True, training=True)
    wide = (cm.Problem(16384, 64, 64, MonarchShape(1, 320, 64, 1, 64, 320), "gelu"),
            cm.Problem(16384, 64, 64, MonarchShape(1, 32, 64, 1, 64, 32)))
    assert cm.mlp_forward(*wide).time() > 0  # the forward takes the pair
    assert not gd.fused_mlp_wins(*wide, torch.bfloat16, ("triton", "triton"), eager=False, training=True)
    with pytest.raises(ValueError, match="backward does not take"):
        cm.mlp_training_step(*wide)


@pytest.mark.parametrize("n_in,n_out,nblocks", [(1024, 4096, 4), (4096, 1024, 4), (768, 3072, 4), (700, 3000, 8)])
def test_non_square_calls_are_priced_with_the_layers_block_count(n_in, n_out, nblocks):
    """The rule prices the ``MonarchLinear`` layout whose largest block side is the call's ``block``: for a
    non-square (and a ragged) layer that is the layer's own ``nblocks``, recovered from the wider side."""
    from monarch_kernels import backends

    sh = mk.monarch_factor_shapes(n_in, n_out, nblocks)
    dims = (512, n_in, n_out, max(sh.p, sh.q, sh.r, sh.s))
    assert gd._problem(dims, "gelu", True) == cm.Problem.linear(512, n_in, n_out, nblocks, "gelu", bias=True)
    want = cm.estimate("torch", "reference", "fwd", cm.Problem.linear(512, n_in, n_out, nblocks), "bfloat16").time()
    assert gd.predicted_seconds("torch", "monarch", "bfloat16", dims) == pytest.approx(want)
    assert backends.Dims(dims, "relu")[3] == dims[3]


def test_fastest_prices_the_calls_fused_activation_and_bias(monkeypatch):
    """:func:`gpu_dispatch.fastest` prices every candidate with the activation and the bias its ``Dims`` carry (a
    plain tuple: none), and picks the cheapest at those prices."""
    from monarch_kernels import backends

    sh = mk.monarch_factor_shapes(2048, 2048, 2)
    dims = (2048, 2048, 2048, max(sh.p, sh.q, sh.r, sh.s))
    seen, real = [], gd.call_seconds
    monkeypatch.setattr(gd, "call_seconds", lambda *a: seen.append(a[5:]) or real(*a))
    for act, bias in (("gelu", False), ("relu", True), ("none", True)):
        seen.clear()
        got = gd.fastest("monarch", torch.bfloat16, backends.Dims(dims, act, bias), ["triton", "torch"], True,
                         eager=False)
        assert seen == [(act, False, bias)] * 2
        assert got == min(("triton", "torch"), key=lambda b: gd.predicted_seconds(b, "monarch", "bfloat16", dims,
                                                                                  True, act, bias))
    seen.clear()
    gd.fastest("monarch", torch.bfloat16, dims, ["triton", "torch"], True, eager=False)
    assert seen == [("none", False, False)] * 2
