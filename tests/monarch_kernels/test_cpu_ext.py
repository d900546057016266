"""C++ CPU kernels (the ``cpu`` backend) against the float64 reference: both schedules (row tiles with the
intermediate in cache; block-parallel for few tokens), ragged sizes, strided inputs, batch 0/1, dtypes, and
outputs poisoned with NaN (deterministic mode fills every fresh allocation, ``at::empty`` included)."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref
from conftest import rel_err

if mk.available_backends()["cpu"] != "available":
    pytest.skip("cpu extension not built: " + mk.available_backends()["cpu"], allow_module_level=True)

from monarch_kernels.ext import Primitives as C  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SHAPES = [((4, 12, 12), (4, 48, 12)), ((4, 12, 48), (4, 12, 12)), ((5, 5, 7), (5, 6, 5)), ((4, 5, 8), (4, 6, 5)),
          ((4, 2, 2), (4, 5, 2))]  # the last: MonarchLinear(6, 18, nblocks=4), a fully padded input block


pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _d(t):
    return t.double()


@pytest.mark.parametrize("T", [1, 5, 97])  # few tiles (block-parallel) and several row tiles
@pytest.mark.parametrize("s1,s2", SHAPES)
def test_monarch_ops_float64(s1, s2, T):
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in, n_out = max(1, sh.n_in - sh.p // 2 - 1), max(1, sh.n_out - sh.s // 2 - 1)
    x, g = torch.randn(T, n_in, dtype=torch.float64), torch.randn(T, n_out, dtype=torch.float64)
    w1, w2 = torch.randn(s1, dtype=torch.float64), torch.randn(s2, dtype=torch.float64)
    b = torch.randn(n_out, dtype=torch.float64)
    assert rel_err(C.monarch_fwd(x, w1, w2, b, n_out, "gelu"), ref.monarch_fwd(x, w1, w2, b, n_out, "gelu")) < 1e-12
    assert rel_err(C.monarch_bwd_input(g, w1, w2, n_in), ref.monarch_bwd_input(g, w1, w2, n_in)) < 1e-12
    for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(x, g, w1, w2)):
        assert rel_err(a, e) < 1e-12


# weights in place (dot-product kernel) below 256 tokens, packed from 256
@pytest.mark.parametrize("T", [1, 6, 97, 255, 256])
# the last: K tails and partial register blocks
@pytest.mark.parametrize("s1,s2", SHAPES + [((4, 40, 36), (5, 33, 32))])
def test_monarch_ops_float32(s1, s2, T):
    """float32 runs the AVX-512 kernels where the host has them (both the packed and the in-place weight paths)."""
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in, n_out = max(1, sh.n_in - 3), max(1, sh.n_out - 2)
    x, g = torch.randn(T, n_in), torch.randn(T, n_out)
    w1, w2, b = torch.randn(s1), torch.randn(s2), torch.randn(n_out)
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu_tanh")
    assert rel_err(C.monarch_fwd(x, w1, w2, b, n_out, "gelu_tanh"), expect) < TOL[torch.float32]
    assert rel_err(C.monarch_bwd_input(g, w1, w2, n_in), ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)) < 1e-5
    for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))):
        assert rel_err(a, e) < TOL[torch.float32]


@pytest.mark.parametrize("T", [3, 80])
def test_blockdiag_ops_float32(T):
    x, g = torch.randn(T, 70), torch.randn(T, 66)
    w, b = torch.randn(4, 17, 18), torch.randn(66)
    assert rel_err(C.blockdiag_fwd(x, w, b, 66, "relu"), ref.blockdiag_fwd(_d(x), _d(w), _d(b), 66, "relu")) < 1e-5
    assert rel_err(C.blockdiag_wgrad(x, g, 4, 17, 18), ref.blockdiag_wgrad(_d(x), _d(g), 4, 17, 18)) < 1e-5


@pytest.mark.parametrize("T", [5, 70])  # block-parallel schedule (fp32 partial sums) and row tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_monarch_low_precision(dtype, T):
    s1, s2 = SHAPES[0]
    x, g = torch.randn(T, 47).to(dtype), torch.randn(T, 191).to(dtype)
    w1, w2, b = torch.randn(s1).to(dtype), torch.randn(s2).to(dtype), torch.randn(191).to(dtype)
    out = C.monarch_fwd(x, w1, w2, b, 191, "relu")
    assert out.dtype == dtype
    assert rel_err(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), 191, "relu")) < TOL[dtype]
    assert rel_err(C.monarch_bwd_input(g, w1, w2, 47), ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), 47)) < TOL[dtype]
    for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))):
        assert rel_err(a, e) < TOL[dtype]


@pytest.mark.parametrize("T", [3, 80])
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_blockdiag_ops(T, act):
    x, g = torch.randn(T, 30, dtype=torch.float64), torch.randn(T, 26, dtype=torch.float64)
    w, b = torch.randn(4, 7, 8, dtype=torch.float64), torch.randn(26, dtype=torch.float64)
    assert rel_err(C.blockdiag_fwd(x, w, b, 26, act), ref.blockdiag_fwd(x, w, b, 26, act)) < 1e-12
    assert rel_err(C.blockdiag_wgrad(x, g, 4, 7, 8), ref.blockdiag_wgrad(x, g, 4, 7, 8)) < 1e-12


def test_strided_inputs_and_weights():
    s1, s2 = SHAPES[1]
    big = torch.randn(90, 2 * 48, dtype=torch.float64)
    x = big[::3, ::2]
    w1 = torch.randn(4, 48, 12, dtype=torch.float64).transpose(1, 2)  # non-contiguous (4, 12, 48)
    w2 = torch.randn(s2, dtype=torch.float64)
    g = torch.randn(12, 60, dtype=torch.float64).T[:, :48]  # transposed, sliced
    assert rel_err(C.monarch_fwd(x, w1, w2, None, 48, "none"), ref.monarch_fwd(x, w1, w2, None, 48)) < 1e-12
    assert rel_err(C.monarch_bwd_input(g, w1, w2, 48), ref.monarch_bwd_input(g, w1, w2, 48)) < 1e-12


def test_empty_batch():
    w1, w2 = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    x = torch.randn(0, 12)
    assert C.monarch_fwd(x, w1, w2, None, 12, "none").shape == (0, 12)
    dw1, dw2 = C.monarch_bwd_weight(x, torch.randn(0, 12), w1, w2)
    assert torch.equal(dw1, torch.zeros_like(w1)) and torch.equal(dw2, torch.zeros_like(w2))


def test_backend_through_ops_api():
    """backend='cpu' through the dispatcher: outputs and gradients (double backward too) match torch."""
    x = torch.randn(5, 40, 47, dtype=torch.float64)
    w1, w2 = torch.randn(4, 12, 12, dtype=torch.float64), torch.randn(4, 48, 12, dtype=torch.float64)
    b = torch.randn(190, dtype=torch.float64)
    res = {}
    for backend in ("torch", "cpu"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
        out = mk.monarch_linear(*leaves, out_features=190, activation="gelu", backend=backend)
        grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
        gg = torch.autograd.grad(sum(gr.pow(2).sum() for gr in grads[:3]), leaves[:3])
        res[backend] = (out, *grads, *gg)
    for a, e in zip(res["cpu"], res["torch"]):
        assert rel_err(a, e) < 1e-10


def test_auto_dispatch_rule():
    """The measured rule of monarch_kernels/cpu_dispatch.py: fp16 from 4 tokens; fp32 with blocks <= 64; fp32
    Monarch with blocks <= 1024 below 64 tokens, with blocks <= 128 also from 1024 tokens, larger blocks below 32
    tokens; fp64 Monarch with blocks <= 64, or <= 128 from 256 tokens; never bf16 or complex."""
    x_small, x_big = torch.randn(4, 48), torch.randn(4096, 48)
    w1, w2 = torch.randn(4, 12, 12), torch.randn(4, 48, 12)
    assert mk.resolve_backend("monarch", x_big, w1, w2) == "cpu"
    assert mk.resolve_backend("monarch", x_small[:1], w1, w2) == "cpu"
    big_blocks = torch.randn(2, 256, 256), torch.randn(2, 256, 256)
    assert mk.resolve_backend("monarch", torch.randn(63, 512), *big_blocks) == "cpu"
    assert mk.resolve_backend("monarch", torch.randn(64, 512), *big_blocks) == "torch"
    assert mk.resolve_backend("monarch", torch.randn(1023, 512), *big_blocks) == "torch"
    assert mk.resolve_backend("monarch", torch.randn(4096, 512), *big_blocks) == "torch"
    blocks128 = torch.randn(4, 128, 128), torch.randn(4, 128, 128)
    assert mk.resolve_backend("monarch", torch.randn(1023, 512), *blocks128) == "torch"
    assert mk.resolve_backend("monarch", torch.randn(1024, 512), *blocks128) == "cpu"
    assert mk.resolve_backend("monarch", torch.randn(63, 512), *blocks128) == "cpu"
    huge = torch.randn(1, 1025, 4), torch.randn(1, 4, 1025)  # blocks past L2: MKL's blocking wins with many tokens
    assert mk.resolve_backend("monarch", torch.randn(31, 4), *huge) == "cpu"
    assert mk.resolve_backend("monarch", torch.randn(32, 4), *huge) == "torch"
    assert mk.resolve_backend("monarch", x_small.double(), w1.double(), w2.double()) == "cpu"
    mid = [t.double() for t in (torch.randn(2, 128, 128), torch.randn(2, 128, 128))]
    assert mk.resolve_backend("monarch", torch.randn(256, 256, dtype=torch.float64), *mid) == "cpu"
    assert mk.resolve_backend("monarch", torch.randn(255, 256, dtype=torch.float64), *mid) == "torch"
    big64 = [t.double() for t in big_blocks]
    assert mk.resolve_backend("monarch", torch.randn(4096, 512, dtype=torch.float64), *big64) == "torch"
    assert mk.resolve_backend("monarch", x_small[:3].half(), w1.half(), w2.half()) == "torch"
    assert mk.resolve_backend("monarch", x_small.half(), w1.half(), w2.half()) == "cpu"
    assert mk.resolve_backend("monarch", x_big.bfloat16(), w1.bfloat16(), w2.bfloat16()) == "torch"
    assert mk.resolve_backend("monarch", x_big.to(torch.complex64), w1.to(torch.complex64),
                              w2.to(torch.complex64)) == "torch"
    assert mk.resolve_backend("blockdiag", x_big, torch.randn(4, 12, 12)) == "cpu"
    assert mk.resolve_backend("blockdiag", torch.randn(64, 512), torch.randn(2, 256, 256)) == "torch"
    assert mk.resolve_backend("blockdiag", torch.randn(64, 512).half(), torch.randn(2, 256, 256).half()) == "cpu"


def test_auto_dispatch_counts_tokens_over_all_leading_dims():
    """The rule's token count is the product of every leading dim (64 tokens as (1, 64), (64, 1) or (8, 8): past
    the fp32 rule's 63-token threshold for 256-wide blocks), not the first dim alone; and fp64 block-diagonal
    products never go to the C++ kernels (the fp64 branch is for Monarch products only)."""
    big_blocks = torch.randn(2, 256, 256), torch.randn(2, 256, 256)
    for lead in ((1, 64), (64, 1), (8, 8), (2, 2, 16)):
        assert mk.resolve_backend("monarch", torch.randn(*lead, 512), *big_blocks) == "torch", lead
    assert mk.resolve_backend("monarch", torch.randn(9, 7, 512), *big_blocks) == "cpu"  # 63 tokens
    w64 = torch.randn(4, 12, 12, dtype=torch.float64)
    assert mk.resolve_backend("blockdiag", torch.randn(5, 48, dtype=torch.float64), w64) == "torch"
    assert mk.resolve_backend("blockdiag", torch.randn(4096, 48, dtype=torch.float64), w64) == "torch"


def test_weights_are_never_stale():
    """In-place updates and fresh tensors at recycled addresses are always seen (no stale packed copies)."""
    x = torch.randn(3, 48, dtype=torch.float64)
    w1, w2 = torch.randn(4, 12, 12, dtype=torch.float64), torch.randn(4, 48, 12, dtype=torch.float64)
    first = C.monarch_fwd(x, w1, w2, None, 192, "none")
    with torch.no_grad():
        w1.mul_(2.0)  # an optimizer step in place: the version counter moves
    assert rel_err(C.monarch_fwd(x, w1, w2, None, 192, "none"), 2 * first) < 1e-12
    for _ in range(40):  # fresh weights, some at recycled addresses
        w1, w2 = torch.randn(4, 12, 12, dtype=torch.float64), torch.randn(4, 48, 12, dtype=torch.float64)
        assert rel_err(C.monarch_fwd(x, w1, w2, None, 192, "none"), ref.monarch_fwd(x, w1, w2, None, 192)) < 1e-12


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weight_gradients_for_any_thread_count(threads, dtype):
    """The row-tile schedule splits tokens into one chunk per thread: chunk 0 accumulates into the output
    (fp32/fp64), the others into partial buffers added at the end."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s1, s2 = SHAPES[3]
        x, g = torch.randn(200, 31).to(dtype), torch.randn(200, 21).to(dtype)
        w1, w2 = torch.randn(s1).to(dtype), torch.randn(s2).to(dtype)
        for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))):
            assert rel_err(a, e) < TOL[dtype]
    finally:
        torch.set_num_threads(previous)


def test_decode_kernel_selection_validates_its_argument():
    from monarch_kernels import ext

    with pytest.raises(ValueError, match="decode_kernel: name='fast' must be one of"):
        with ext.decode_kernel("fast"):
            pass
    if not ext.built_with_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            with ext.decode_kernel("rowsplit"):
                pass


def test_many_token_kernel_selection_validates_its_argument():
    from monarch_kernels import ext

    with pytest.raises(ValueError, match="many_token_kernel: name='fused' must be one of"):
        with ext.many_token_kernel("fused"):
            pass
    if not ext.built_with_cuda():
        with pytest.raises(RuntimeError, match="many_token_kernel: the extension was built without CUDA"):
            with ext.many_token_kernel("tiles"):
                pass
