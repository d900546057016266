"""``monarch_kernels.monarch_mlp``: ``fc2(act(fc1(x)))`` with the hidden layer fused on the Triton backend
(``monarch_kernels/triton/mlp.py``, run here in Triton's interpreter) against the float64 composition of the
reference, per element, outputs poisoned; the values of the two Triton layers run in turn; training calls
(the fused backward: every gradient against float64 autograd, frozen parameters, ``create_graph``); the calls
it does not fuse take the two layers; argument checks; ``auto``'s choice on a GPU."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref
from monarch_kernels.shapes import monarch_factor_shapes
from conftest import RTOL, rel_err

#: the Triton backend runs CUDA tensors on a GPU, CPU tensors in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.skipif(mk.available_backends()["triton"] != "available",
                                 reason="needs the Triton backend (interpreter)"),
              pytest.mark.usefixtures("poisoned_allocations")]  # fresh outputs start as NaN


def _token_counts(monkeypatch, name):
    """The token counts of every call of ``monarch_kernels.triton.mlp.<name>`` from now on (a list that grows)."""
    from monarch_kernels.triton import mlp

    calls = []
    original = getattr(mlp, name)

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, name, counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused hidden-layer launches (:func:`monarch_kernels.triton.mlp.hidden_layer`)."""
    return _token_counts(monkeypatch, "hidden_layer")


@pytest.fixture
def fused_backward_calls(monkeypatch):
    """Counts the fused hidden-layer backward launches (:func:`monarch_kernels.triton.mlp.hidden_layer_backward`)."""
    return _token_counts(monkeypatch, "hidden_layer_backward")


def mlp_params(n_in, n_h, nb1, nb2, dtype, gen, n_out=None):
    n_out = n_in if n_out is None else n_out
    sh1, sh2 = monarch_factor_shapes(n_in, n_h, nb1), monarch_factor_shapes(n_h, n_out, nb2)
    w = [torch.randn(*sh1.w1_shape, generator=gen) / sh1.p ** 0.5,
         torch.randn(*sh1.w2_shape, generator=gen) / sh1.r ** 0.5,
         torch.randn(*sh2.w1_shape, generator=gen) / sh2.p ** 0.5,
         torch.randn(*sh2.w2_shape, generator=gen) / sh2.r ** 0.5,
         torch.randn(n_h, generator=gen), torch.randn(n_out, generator=gen)]
    return [t.to(DEVICE, dtype) for t in w]


def expected(x, params, act, n_out):
    d = [t.double() for t in params]
    hidden = ref.monarch_fwd(x.double().reshape(-1, x.shape[-1]), d[0], d[1], d[4], d[4].shape[0], act)
    out = ref.monarch_fwd(hidden, d[2], d[3], d[5][:n_out], n_out, "none")
    return out.reshape(*x.shape[:-1], n_out)


# (n_in, n_h, nblocks of fc1, of fc2): a GPT-2-like MLP at 1/12 width (q2 = 16, S = 16 hidden rows per (fc2
# block, fc1 block): one 16-row chunk), q2 = S = 24 (padded to 32 in the kernel), 2 and 8 blocks, fc1 and fc2
# with different block counts (p2 = 128 = 32 · l1), one block in fc2, and every loop of the kernel over more
# than one chunk, the last one ragged: r1 = 80 (64-wide K steps), S = 80 (32-row chunks), q2 = 80 (padded to 128)
SHAPES = [(64, 256, 4, 4), (96, 384, 4, 4), (64, 256, 2, 2), (256, 1024, 8, 8), (64, 256, 4, 2), (32, 128, 4, 1),
          (160, 320, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_matches_float64_and_the_layers_in_turn(shape, dtype, fused_calls):
    """Leading dims with 70 tokens (a ragged last tile of 64) and 1 token; bias + GELU; and the two Triton layers
    run in turn (the same roundings: the hidden activation rounded to the dtype)."""
    n_in, n_h, nb1, nb2 = shape
    gen = torch.Generator().manual_seed(sum(shape))
    params = mlp_params(n_in, n_h, nb1, nb2, dtype, gen)
    for lead in ((2, 35), (1,)):
        x = torch.randn(*lead, n_in, generator=gen).to(DEVICE, dtype)
        out = mk.monarch_mlp(x, *params, activation="gelu", backend="triton")
        assert out.shape == (*lead, n_in) and out.dtype == dtype
        assert rel_err(out, expected(x, params, "gelu", n_in)) < 2 * RTOL[dtype]
        hidden = mk.monarch_linear(x, params[0], params[1], params[4], activation="gelu", backend="triton")
        layered = mk.monarch_linear(hidden, params[2], params[3], params[5], backend="triton")
        assert rel_err(out, layered) < RTOL[dtype]  # fp32 sums in another order: not always bit-equal
    assert len(fused_calls) == 2


def test_several_token_tiles(fused_calls):
    """300 tokens: three 128-token tiles, the last ragged, each with its own programs per fc2 block."""
    gen = torch.Generator().manual_seed(6)
    params = mlp_params(160, 320, 2, 2, torch.bfloat16, gen)
    x = torch.randn(300, 160, generator=gen).to(DEVICE, torch.bfloat16)
    out = mk.monarch_mlp(x, *params, activation="gelu_tanh", backend="triton")
    assert rel_err(out, expected(x, params, "gelu_tanh", 160)) < 2 * RTOL[torch.bfloat16]
    assert fused_calls == [300]


@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh"])
def test_activations_no_bias_truncated_output_and_strided_input(act, fused_calls):
    gen = torch.Generator().manual_seed(1)
    params = mlp_params(64, 256, 4, 4, torch.bfloat16, gen)
    params[4] = None
    x = torch.randn(40, 128, generator=gen).to(DEVICE, torch.bfloat16)[:, ::2]  # column stride 2
    out = mk.monarch_mlp(x, *params[:4], None, params[5][:50], activation=act, out_features=50, backend="triton")
    want = expected(x, params[:4] + [torch.zeros(256, device=DEVICE), params[5]], act, 50)
    assert out.shape == (40, 50) and rel_err(out, want) < 2 * RTOL[torch.bfloat16]
    assert fused_calls == [40]


def test_nan_and_inf_stay_in_their_token_rows(fused_calls):
    gen = torch.Generator().manual_seed(2)
    params = mlp_params(64, 256, 4, 4, torch.float16, gen)
    x = torch.randn(20, 64, generator=gen).to(DEVICE, torch.float16)
    x[3, 5] = float("nan")
    x[11, 60] = float("inf")
    out = mk.monarch_mlp(x, *params, activation="relu", backend="triton")
    want = expected(x, params, "relu", 64)
    others = [t for t in range(20) if t not in (3, 11)]
    assert want[3].isnan().all() and want[others].isfinite().all()
    assert rel_err(out, want) < 2 * RTOL[torch.float16]
    assert fused_calls == [20]


def test_calls_it_does_not_fuse_run_the_layers(fused_calls):
    """fp32, an input narrower than fc1's blocks, fc2 blocks that are not whole fc1 stage-2 rows (p2 = 6, l1 = 4),
    fewer than 16 of them per fc1 block (square 256-wide layers in 16 blocks: S = 1), q2 = 320 past the 256-wide
    accumulator, the torch backend: the same values as the layers, no fused launch."""
    gen = torch.Generator().manual_seed(3)
    bf = torch.bfloat16
    q2_wide = mlp_params(64, 64, 4, 4, bf, gen)
    q2_wide[2] = torch.randn(1, 320, 64, generator=gen).to(DEVICE, bf) / 8
    q2_wide[3] = torch.randn(2, 8, 160, generator=gen).to(DEVICE, bf) / 12
    q2_wide[5] = torch.randn(16, generator=gen).to(DEVICE, bf)
    cases = [(mlp_params(64, 256, 4, 4, torch.float32, gen), 64, "triton"),
             (mlp_params(64, 256, 4, 4, bf, gen), 60, "triton"),
             (mlp_params(64, 96, 4, 16, bf, gen), 64, "triton"),
             (mlp_params(256, 256, 16, 16, bf, gen), 256, "triton"),
             (q2_wide, 64, "triton"),
             (mlp_params(64, 256, 4, 4, bf, gen), 64, "torch")]
    for params, width, backend in cases:
        x = torch.randn(30, width, generator=gen).to(DEVICE, params[0].dtype)
        out = mk.monarch_mlp(x, *params, backend=backend)
        n_out = params[5].shape[0]
        assert rel_err(out, expected(x, params, "gelu", n_out)) < 2 * RTOL[x.dtype], (width, backend)
    assert fused_calls == []
    params = mlp_params(64, 256, 4, 4, bf, gen)
    x = torch.randn(30, 64, generator=gen).to(DEVICE, bf)
    leaves = [p.clone().requires_grad_() for p in params]
    # a hidden width below fc1's blocks (ragged: fc1 truncated, fc2's input zero-padded): the layers in turn
    out = mk.monarch_mlp(x, *params[:4], params[4][:250], params[5], hidden_features=250, backend="triton")
    d = [t.double() for t in params]
    hidden = ref.monarch_fwd(x.double(), d[0], d[1], d[4][:250], 250, "gelu")
    assert rel_err(out, ref.monarch_fwd(hidden, d[2], d[3], d[5], 64, "none")) < 2 * RTOL[bf]
    assert fused_calls == []
    mk.monarch_mlp(x.cpu(), *[p.cpu() for p in params])  # auto on CPU tensors: the layers (never the interpreter)
    assert fused_calls == []
    with torch.no_grad():  # the same parameters without autograd recording: fused
        mk.monarch_mlp(x, *leaves, backend="triton")
    assert fused_calls == [30]


def test_bad_arguments_name_the_argument():
    gen = torch.Generator().manual_seed(4)
    params = [p.cpu() for p in mlp_params(64, 256, 4, 4, torch.float32, gen)]
    x = torch.randn(5, 64)
    small = [p.cpu() for p in mlp_params(64, 128, 4, 4, torch.float32, gen)]
    with pytest.raises(ValueError, match="exceeds fc2's input width"):
        mk.monarch_mlp(x, params[0], params[1], small[2], small[3])
    with pytest.raises(ValueError, match="hidden_features"):
        mk.monarch_mlp(x, *params, hidden_features=257)
    with pytest.raises(ValueError, match="bias"):
        mk.monarch_mlp(x, *params[:4], torch.randn(255), params[5])
    with pytest.raises(ValueError, match="activation"):
        mk.monarch_mlp(x, *params, activation="tanh")
    with pytest.raises(ValueError, match="x"):
        mk.monarch_mlp(torch.randn(5, 65), *params)


def test_auto_on_a_gpu_fuses_where_the_rule_says(monkeypatch):
    """``auto`` for a CUDA tensor (a stand-in with its device, dtype and shape; the rule needs nothing else):
    the fused Triton forward where :func:`monarch_kernels.gpu_dispatch.fused_mlp_wins` prices it below the two
    layers — GPT-2's MLP eager at 65536 tokens, not at 16384 (host time), in inference and in training; a
    requested backend is kept."""
    from monarch_kernels import ops

    class Cuda:
        device, dtype = torch.device("cuda"), torch.bfloat16

        def __init__(self, tokens, width):
            self.shape = (tokens, width)

        def numel(self):
            return self.shape[0] * self.shape[1]

    sh1, sh2 = monarch_factor_shapes(768, 3072, 4), monarch_factor_shapes(3072, 768, 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert ops._mlp_backend(Cuda(65536, 768), sh1, sh2, 3072, 768, "gelu", None) == "triton"
    assert ops._mlp_backend(Cuda(16384, 768), sh1, sh2, 3072, 768, "gelu", None) is None
    assert ops._mlp_backend(Cuda(16384, 768), sh1, sh2, 3072, 768, "gelu", "triton") == "triton"
    # training calls: priced by the fused training step against the layers' steps
    assert ops._mlp_backend(Cuda(65536, 768), sh1, sh2, 3072, 768, "gelu", None, True) == "triton"
    assert ops._mlp_backend(Cuda(16384, 768), sh1, sh2, 3072, 768, "gelu", None, True) is None


def layered(x, params, act, backend="triton"):
    """The two layers in turn (the fused MLP's roundings: the hidden activation stored in the dtype)."""
    hidden = mk.monarch_linear(x, params[0], params[1], params[4], activation=act, backend=backend)
    return mk.monarch_linear(hidden, params[2], params[3], params[5], backend=backend)


def grads_of(fn, x, params, g, wanted=None):
    """``fn(x, params)``'s output and the gradients of ``⟨g, out⟩`` for fresh leaves (``wanted``: which of ``x,
    *params`` require grad, default all); ``None`` for the others."""
    wanted = [True] * (1 + len(params)) if wanted is None else wanted

    def leaf(t, w):  # with t's strides (a strided view stays strided)
        copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())
        return copy.requires_grad_(w)

    leaves = [leaf(t, w) if t is not None else None for t, w in zip([x, *params], wanted)]
    out = fn(leaves[0], leaves[1:])
    out.backward(g)
    return out, [t.grad if t is not None else None for t in leaves]


#: training shapes (n_in, n_h, nb1, nb2): fc1's r1 in one 64-wide chunk (16), two (80, ragged), three (192: GPT-2's
#: r1, with 2 blocks; 12 chunks of S = 384 hidden rows in one block) and four (256)
TRAIN_SHAPES = [(64, 256, 4, 4), (160, 320, 2, 2), (384, 768, 2, 2), (192, 384, 1, 1), (256, 512, 1, 1)]


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype,act", [(torch.bfloat16, "gelu"), (torch.float16, "gelu_tanh")], ids=str)
def test_training_gradients_match_float64(shape, dtype, act, fused_calls, fused_backward_calls):
    """Every gradient (x, both layers' factors and biases) of a training call against float64 autograd through
    the reference's layers, per element; leading dims with 70 tokens (a ragged 128-token tile)."""
    n_in, n_h, nb1, nb2 = shape
    gen = torch.Generator().manual_seed(10 + sum(shape))
    params = mlp_params(n_in, n_h, nb1, nb2, dtype, gen)
    x = torch.randn(2, 35, n_in, generator=gen).to(DEVICE, dtype)
    g = torch.randn(2, 35, n_in, generator=gen).to(DEVICE, dtype)
    out, grads = grads_of(lambda x_, p: mk.monarch_mlp(x_, *p, activation=act, backend="triton"), x, params, g)
    d = [t.double() for t in params]
    want, want_grads = grads_of(lambda x_, p: layered(x_, p, act, "torch"), x.double(), d, g.double())
    assert fused_calls == [70] and fused_backward_calls == [70]
    assert out.dtype == dtype and rel_err(out, want) < 2 * RTOL[dtype]
    for name, a, b in zip(["x", "fc1_w1", "fc1_w2", "fc2_w1", "fc2_w2", "fc1_bias", "fc2_bias"], grads, want_grads):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert rel_err(a, b) < 2 * RTOL[dtype], name


@pytest.mark.parametrize("act", ["relu", "none"])
def test_training_matches_the_layers_in_turn(act, fused_backward_calls):
    """relu (its derivative jumps where the dtype's pre-activation changes sign, so float64 is not the yardstick)
    and no activation: the gradients of the two Triton layers run in turn, which round alike; 130 tokens (two
    token tiles, the last ragged: the bias gradient's per-tile partials), no fc2 bias."""
    gen = torch.Generator().manual_seed(11)
    params = mlp_params(160, 320, 2, 2, torch.bfloat16, gen)
    params[5] = None
    x = torch.randn(130, 160, generator=gen).to(DEVICE, torch.bfloat16)
    g = torch.randn(130, 160, generator=gen).to(DEVICE, torch.bfloat16)
    wanted = [True, True, True, True, True, True, False]
    out, grads = grads_of(lambda x_, p: mk.monarch_mlp(x_, *p, activation=act, backend="triton"), x, params, g, wanted)
    ref_out, ref_grads = grads_of(lambda x_, p: layered(x_, p, act), x, params, g, wanted)
    assert fused_backward_calls == [130]
    assert rel_err(out, ref_out) < RTOL[torch.bfloat16]
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < RTOL[torch.bfloat16]
    if act == "none":
        d = [t.double() if t is not None else None for t in params]
        _, want = grads_of(lambda x_, p: layered(x_, p, act, "torch"), x.double(), d, g.double(), wanted)
        for a, b in zip(grads, want):
            if a is not None:
                assert rel_err(a, b) < 2 * RTOL[torch.bfloat16]


def test_frozen_parameters_and_no_input_gradient(fused_backward_calls):
    """Only fc2's factors train (x and fc1 frozen): those gradients, nothing for the others; then only x (every
    parameter frozen, as when a frozen MLP sits inside a trained model); then every parameter but not x (the
    input of a model: fc1's dw1 without dx); x a strided view (column stride 2)."""
    gen = torch.Generator().manual_seed(12)
    params = mlp_params(64, 256, 4, 4, torch.bfloat16, gen)
    x = torch.randn(40, 128, generator=gen).to(DEVICE, torch.bfloat16)[:, ::2]
    g = torch.randn(40, 64, generator=gen).to(DEVICE, torch.bfloat16)
    fused = lambda x_, p: mk.monarch_mlp(x_, *p, backend="triton")
    assert x.stride() == (128, 2)
    for wanted in ([False, False, False, True, True, False, False], [True] + [False] * 6, [False] + [True] * 6):
        _, grads = grads_of(fused, x, params, g, wanted)
        _, ref_grads = grads_of(lambda x_, p: layered(x_, p, "gelu"), x, params, g, wanted)
        for a, b, w in zip(grads, ref_grads, wanted):
            assert (a is not None) == w
            if w:
                assert rel_err(a, b) < RTOL[torch.bfloat16]
    assert fused_backward_calls == [40, 40, 40]


def test_frozen_factors_run_no_weight_gradient(monkeypatch):
    """``mlp_backward`` with ``want_dw`` (and no ``dx``): every weight-gradient path of the backend is counted
    (the batched GEMMs, the block-diagonal weight-gradient kernel, the fused dx + dW kernel's launch plan); all
    factors frozen runs none, each factor alone runs its own share of the all-factors call, and what is computed
    equals that call's results bit for bit. The hidden layer's kernel stores the ``T × n_h`` activation only for
    fc2's ``dw1`` and ``dpre`` only for fc1's ``dw2`` (a store left in would land on its placeholder, ``dz1``)."""
    from monarch_kernels.triton import mlp as tmlp, monarch as tmon

    calls = []

    def count(module, name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))

    for name in ("_bmm_dw1", "_bmm_dw2", "_dw2", "_bmm_dxw", "bd_weight_grad"):
        count(tmon, name)
    count(tmon, "_dxw_plan")
    stored = []
    hidden = tmlp.hidden_layer_backward
    monkeypatch.setattr(tmlp, "hidden_layer_backward", lambda *a, **k: (
        lambda out: stored.append((out[0] is not None, out[1] is not None)) or out)(hidden(*a, **k)))
    gen = torch.Generator().manual_seed(13)
    w1a, w2a, w1b, w2b, b1, b2 = mlp_params(64, 256, 4, 4, torch.bfloat16, gen)
    x = torch.randn(40, 64, generator=gen).to(DEVICE, torch.bfloat16)
    g = torch.randn(40, 64, generator=gen).to(DEVICE, torch.bfloat16)
    saved = tmlp.mlp_forward_saving(x, w1a, w2a, b1, w1b, w2b, b2, 64, "gelu")[1:]

    def backward(want_dx, want_dw):
        calls.clear()
        stored.clear()
        out = tmlp.mlp_backward(x, g, w1a, w2a, b1, w1b, w2b, *saved, "gelu", True, want_dx, want_dw)
        assert stored == [(want_dw[2], want_dw[1])]  # (a, dpre) for (w1b, w2a)
        return out

    full = backward(False, (True,) * 4)
    n_full = len(calls)
    assert n_full >= 4
    frozen = backward(True, (False,) * 4)
    assert calls == [] and frozen[1] is None and frozen[2] is None and frozen[4] is None and frozen[5] is None
    assert torch.equal(frozen[0], backward(True, (True,) * 4)[0])  # dx as when everything trains
    n_single = 0
    for i, slot in enumerate((1, 2, 4, 5)):  # w1a, w2a, w1b, w2b's places in the result
        single = backward(False, tuple(j == i for j in range(4)))
        n_single += len(calls)
        assert single[0] is None
        for j, other in enumerate((1, 2, 4, 5)):
            assert (single[other] is None) == (j != i)
        assert torch.equal(single[slot], full[slot])
        assert torch.equal(single[3], full[3]) and torch.equal(single[6], full[6])  # the biases' gradients
    assert n_single == n_full


def test_create_graph_differentiates_the_layers(fused_backward_calls):
    """A gradient penalty: ``d/dw ‖∂⟨g, out⟩/∂x‖²`` through ``create_graph=True`` (the layers recomputed and
    differentiated, no fused backward) against the same through the two layers."""
    gen = torch.Generator().manual_seed(13)
    params = mlp_params(64, 256, 4, 4, torch.float16, gen)
    x = torch.randn(20, 64, generator=gen).to(DEVICE, torch.float16)
    g = torch.randn(20, 64, generator=gen).to(DEVICE, torch.float16)

    def penalty_grads(fn):
        xl = x.clone().requires_grad_()
        leaves = [p.clone().requires_grad_() for p in params]
        (dx,) = torch.autograd.grad(fn(xl, leaves), xl, g, create_graph=True)
        (dx.float() ** 2).sum().backward()
        return [t.grad for t in leaves]

    fused = penalty_grads(lambda x_, p: mk.monarch_mlp(x_, *p, activation="gelu_tanh", backend="triton"))
    ref_grads = penalty_grads(lambda x_, p: layered(x_, p, "gelu_tanh"))
    for a, b in zip(fused, ref_grads):  # fc2's bias does not reach dx: no gradient either way
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < RTOL[torch.float16]
    assert fused[5] is None and fused_backward_calls == []


def test_training_nan_stays_in_its_token_row(fused_backward_calls):
    """A NaN input token: its input-gradient row is NaN, every other row finite and as through the layers."""
    gen = torch.Generator().manual_seed(14)
    params = mlp_params(64, 256, 4, 4, torch.bfloat16, gen)
    x = torch.randn(20, 64, generator=gen).to(DEVICE, torch.bfloat16)
    x[7, 3] = float("nan")
    g = torch.randn(20, 64, generator=gen).to(DEVICE, torch.bfloat16)
    wanted = [True] + [False] * 6
    _, (dx, *_) = grads_of(lambda x_, p: mk.monarch_mlp(x_, *p, backend="triton"), x, params, g, wanted)
    _, (want, *_) = grads_of(lambda x_, p: layered(x_, p, "gelu"), x, params, g, wanted)
    others = [t for t in range(20) if t != 7]
    assert dx[7].isnan().all() and dx[others].isfinite().all()
    assert rel_err(dx[others], want[others]) < RTOL[torch.bfloat16]
    assert fused_backward_calls == [20]


def test_training_calls_it_does_not_fuse_run_the_layers(fused_calls, fused_backward_calls):
    """fc1's r1 = 320 (five 64-wide chunks, past the backward's four): the forward alone would fuse, a training
    call runs the layers (their gradients exactly); no tokens: zero gradients."""
    gen = torch.Generator().manual_seed(15)
    bf = torch.bfloat16
    params = [torch.randn(1, 320, 64, generator=gen) / 8, torch.randn(1, 64, 320, generator=gen) / 18,
              torch.randn(1, 32, 64, generator=gen) / 8, torch.randn(1, 64, 32, generator=gen) / 6,
              torch.randn(64, generator=gen), torch.randn(64, generator=gen)]
    params = [p.to(DEVICE, bf) for p in params]
    x = torch.randn(30, 64, generator=gen).to(DEVICE, bf)
    g = torch.randn(30, 64, generator=gen).to(DEVICE, bf)
    _, grads = grads_of(lambda x_, p: mk.monarch_mlp(x_, *p, backend="triton"), x, params, g)
    _, ref_grads = grads_of(lambda x_, p: layered(x_, p, "gelu"), x, params, g)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    assert fused_calls == [] and fused_backward_calls == []
    with torch.no_grad():
        mk.monarch_mlp(x, *params, backend="triton")
    assert fused_calls == [30]
    params = mlp_params(64, 256, 4, 4, bf, gen)
    _, grads = grads_of(lambda x_, p: mk.monarch_mlp(x_, *p, backend="triton"), x[:0], params, g[:0])
    assert grads[0].shape == (0, 64) and all(torch.equal(t, torch.zeros_like(t)) for t in grads[1:])


def test_fc2_backward_reads_g_as_the_bias_aware_pick_says(monkeypatch):
    """``mlp_backward`` asks the cost model once how fc2's ``dy2`` and ``dw2b`` read ``g``, with fc2's bias
    (summed almost free by a copy of ``g``) and no activation, and hands that pick to the readers as
    ``g_layout``; with a bias, the copy (or ``g.sum(0)`` where ``g`` stays as given) gives ``db2``. Every
    gradient equals the one the unpatched pick gives, to fp32 rounding."""
    from monarch_kernels.triton import mlp as tmlp, monarch as tmon

    gen = torch.Generator().manual_seed(21)
    w1a, w2a, w1b, w2b, b1, b2 = mlp_params(64, 256, 4, 4, torch.float32, gen)
    x = torch.randn(40, 64, generator=gen).to(DEVICE)
    g = torch.randn(40, 64, generator=gen).to(DEVICE)
    saved = tmlp.mlp_forward_saving(x, w1a, w2a, b1, w1b, w2b, b2, 64, "gelu")[1:]
    real_choice, real_out = tmon._model_choice, tmon.output_grads
    asked, layouts = [], []
    monkeypatch.setattr(tmon, "output_grads", lambda g_, z, w2, sh, n, layout, **k: layouts.append(
        (layout, tmon._common.is_token_major(g_))) or real_out(g_, z, w2, sh, n, layout, **k))
    for fc2_bias in (True, False):
        base = tmlp.mlp_backward(x, g, w1a, w2a, b1, w1b, w2b, *saved, "gelu", fc2_bias)
        for picks in ("bmm", "token_major", "grouped"):
            monkeypatch.setattr(tmon, "_model_choice", lambda q, *a, picks=picks: asked.append((q, a[5:])) or (
                picks if q == "g_readers" else real_choice(q, *a)))
            asked.clear()
            layouts.clear()
            got = tmlp.mlp_backward(x, g, w1a, w2a, b1, w1b, w2b, *saved, "gelu", fc2_bias)
            monkeypatch.setattr(tmon, "_model_choice", real_choice)
            assert [a for q, a in asked if q == "g_readers"] == [("none", fc2_bias)], (fc2_bias, picks)
            layout = {"grouped": "row_major"}.get(picks, picks)
            assert layouts == [(layout, fc2_bias and picks != "grouped")], (fc2_bias, picks)
            for i, (a, e) in enumerate(zip(got, base)):
                assert (a is None) == (e is None), i
                if e is not None:
                    assert rel_err(a, e) < RTOL[torch.float32], (fc2_bias, picks, i)
        assert (base[6] is not None) == fc2_bias
