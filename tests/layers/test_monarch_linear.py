"""MonarchLinear / BlockdiagLinear: drop-in behaviour, init, projection round trips, fly keys, bad input."""
import io

import pytest
import torch
from torch import nn

from conftest import rel_err
from helpers import blockdiag_dense
from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, from_fly_state_dict, to_fly_state_dict


@pytest.mark.parametrize("n_in,n_out,nb,w1,w2", [
    (768, 3072, 4, (4, 192, 192), (4, 768, 192)),
    (3072, 768, 4, (4, 192, 768), (4, 192, 192)),
    (100, 70, 8, (8, 9, 13), (8, 9, 9)),
    (70, 100, 8, (8, 9, 9), (8, 13, 9)),
])
def test_factor_shapes_match_fly(n_in, n_out, nb, w1, w2):
    layer = MonarchLinear(n_in, n_out, nblocks=nb)
    assert tuple(layer.w1.shape) == w1 and tuple(layer.w2.shape) == w2
    assert f"in_features={n_in}, out_features={n_out}, nblocks={nb}" in repr(layer)


def test_param_and_flop_accounting():
    layer = MonarchLinear(768, 3072, nblocks=4)
    assert layer.param_fraction == pytest.approx(0.3125)
    assert layer.flops_per_token() == 2 * (layer.w1.numel() + layer.w2.numel())
    assert layer.dense_flops_per_token() == 2 * 768 * 3072
    assert sum(p.numel() for p in layer.parameters()) == layer.w1.numel() + layer.w2.numel() + 3072


@pytest.mark.parametrize("n_in,n_out,nb", [(32, 48, 4), (30, 22, 4), (17, 40, 3), (64, 16, 8), (6, 18, 4), (18, 6, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_weight(n_in, n_out, nb, bias):
    layer = MonarchLinear(n_in, n_out, bias=bias, nblocks=nb, dtype=torch.float64)
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    W = layer.dense_weight()
    assert W.shape == (n_out, n_in)
    ref = x @ W.T + (layer.bias if bias else 0)
    assert rel_err(layer(x), ref) < 1e-12
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and rel_err(lin(x), ref) < 1e-12


def test_init_output_variance_matches_nn_linear():
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    dense = nn.Linear(512, 512, bias=False)(x).var().item()
    for nb in (4, 16):
        mon = MonarchLinear(512, 512, bias=False, nblocks=nb)(x).var().item()
        assert mon == pytest.approx(dense, rel=0.15), (nb, mon, dense)
    mon = MonarchLinear(512, 2048, bias=False, nblocks=4)(x).var().item()
    assert mon == pytest.approx(nn.Linear(512, 2048, bias=False)(x).var().item(), rel=0.15)


def test_from_linear_to_linear_round_trips_monarch_weight():
    src = MonarchLinear(48, 192, nblocks=4, dtype=torch.float64)
    linear = src.to_linear()
    back = MonarchLinear.from_linear(linear, nblocks=4)
    assert rel_err(back.dense_weight(), linear.weight) < 1e-12
    assert rel_err(back.to_linear().weight, linear.weight) < 1e-12
    assert torch.equal(back.bias, linear.bias)
    x = torch.randn(5, 48, dtype=torch.float64)
    assert rel_err(back(x), linear(x)) < 1e-12


def test_from_linear_ragged_sizes_and_dtype_device():
    linear = nn.Linear(30, 22)
    layer = MonarchLinear.from_linear(linear, nblocks=4)
    assert layer.w1.dtype == torch.float32 and layer.in_features == 30 and layer.out_features == 22
    x = torch.randn(3, 30)
    # a projection is an approximation; it must beat the zero map and keep the bias
    err = (layer(x) - linear(x)).norm() / (linear(x) - linear.bias).norm()
    assert err < 1.0
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        MonarchLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fly_state_dict_keys_load_and_convert():
    layer = MonarchLinear(32, 32, nblocks=4)
    fly_sd = {"blkdiag1": torch.randn(4, 8, 8), "blkdiag2": torch.randn(4, 8, 8), "bias": torch.randn(32)}
    layer.load_state_dict(fly_sd)
    assert torch.equal(layer.w1, fly_sd["blkdiag1"]) and torch.equal(layer.w2, fly_sd["blkdiag2"])
    model = nn.Sequential(MonarchLinear(32, 32, nblocks=4), nn.Linear(32, 4))
    sd = model.state_dict()
    fly = to_fly_state_dict(sd, model)
    assert set(fly) == {"0.blkdiag1", "0.blkdiag2", "0.bias", "1.weight", "1.bias"}
    assert set(from_fly_state_dict(fly)) == set(sd)
    fresh = nn.Sequential(MonarchLinear(32, 32, nblocks=4), nn.Linear(32, 4))
    fresh.load_state_dict(fly)
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x))


def test_state_dict_round_trip_weights_only():
    layer = MonarchLinear(24, 40, nblocks=4)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = MonarchLinear(24, 40, nblocks=4)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), layer(x))


def test_factory_kwargs_and_autocast():
    layer = MonarchLinear(32, 64, device="cpu", dtype=torch.bfloat16)
    assert layer.w1.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    layer32 = MonarchLinear(32, 64)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer32(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, layer32(x)) < 2e-2


def test_wrong_input_width_and_bad_constructor():
    layer = MonarchLinear(32, 64)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 32\)"):
        layer(torch.randn(2, 31))
    with pytest.raises(ValueError, match="nblocks=40 must not exceed"):
        MonarchLinear(32, 64, nblocks=40)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        MonarchLinear(0, 64)
    with pytest.raises(TypeError, match="backend must be a str"):
        MonarchLinear(8, 8, backend=1)
    with pytest.raises(TypeError, match="x has dtype"):
        MonarchLinear(32, 64)(torch.ones(2, 32, dtype=torch.long))


def test_from_dense_rejects_bad_weights_clearly():
    """Reliability D8 (layers part): an int weight used to fail with 'only floating point tensors can require
    gradients'."""
    for cls in (MonarchLinear, BlockdiagLinear):
        name = cls.__name__
        with pytest.raises(TypeError, match=f"{name}.from_dense: weight must be a floating-point tensor.*torch.int64"):
            cls.from_dense(torch.ones(8, 8, dtype=torch.long), nblocks=2)
        with pytest.raises(ValueError, match=f"{name}.from_dense: weight must be a 2-D"):
            cls.from_dense(torch.ones(8), nblocks=2)
        with pytest.raises(TypeError, match=f"{name}.from_dense: weight must be a torch.Tensor"):
            cls.from_dense([[1.0]], nblocks=1)
        with pytest.raises(ValueError, match=r"bias must be a \(8,\) tensor"):
            cls.from_dense(torch.ones(8, 4), torch.ones(4), nblocks=2)
        with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
            cls.from_dense(torch.ones(8, 4), torch.ones(8, dtype=torch.long), nblocks=2)


def test_backend_is_honoured():
    layer = MonarchLinear(16, 16, nblocks=4, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        layer(torch.randn(2, 16))


def test_torch_compile_model_matches_eager():
    model = nn.Sequential(MonarchLinear(32, 64, nblocks=4), nn.GELU(), MonarchLinear(64, 32, nblocks=4))
    x = torch.randn(8, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, eager) < 1e-6
    out.pow(2).sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager.pow(2).sum().backward()
    for a, b in zip(g, (p.grad for p in model.parameters())):
        assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------ blockdiag


@pytest.mark.parametrize("n_in,n_out,nb", [(32, 48, 4), (30, 22, 4)])
def test_blockdiag_linear_forward(n_in, n_out, nb):
    layer = BlockdiagLinear(n_in, n_out, nblocks=nb, dtype=torch.float64)
    x = torch.randn(5, n_in, dtype=torch.float64)
    k, q, p = layer.weight.shape
    W = blockdiag_dense(layer.weight)[:n_out, :n_in]
    assert rel_err(layer(x), x @ W.T + layer.bias) < 1e-12
    assert rel_err(layer.to_linear()(x), layer(x)) < 1e-12


def test_blockdiag_shuffle_is_channel_shuffle():
    layer = BlockdiagLinear(12, 12, nblocks=3, shuffle=True, bias=False, dtype=torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    shuffled = x.view(2, 3, 4).transpose(1, 2).reshape(2, 12)  # '(group c) -> (c group)'
    assert rel_err(layer(x), shuffled @ blockdiag_dense(layer.weight).T) < 1e-12
    assert rel_err(layer.to_linear()(x), layer(x)) < 1e-12
    assert "shuffle=True" in repr(layer)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("n_in,n_out", [(30, 21), (21, 30), (13, 6)])
def test_from_dense_ragged_pads_inputs_and_outputs_separately(cls, n_in, n_out):
    """Sizes whose input and output padding differ (30 -> 21 in 4 blocks pads 2 columns and 3 rows): the dense
    weight of a ragged structured layer, zero-padded, is exactly structured again, so from_dense recovers it, and
    the new layer computes x Wᵀ + b per element (float64 dense reference)."""
    torch.manual_seed(0)
    src = cls(n_in, n_out, nblocks=4, dtype=torch.float64)
    W = src.dense_weight().detach()
    back = cls.from_dense(W, src.bias.detach(), nblocks=4)
    assert rel_err(back.dense_weight(), W) < 1e-10
    x = torch.randn(3, n_in, dtype=torch.float64)
    assert rel_err(back(x), x @ W.T + src.bias) < 1e-10


@pytest.mark.parametrize("n_in,n_out", [(64, 256), (256, 64)])
def test_blockdiag_init_bound_and_output_variance(n_in, n_out):
    """BlockdiagLinear's weight is U(±1/√p) with p = ceil(in/nblocks) the block's input width (so the output
    variance is nn.Linear's default, Var(x)/3), for wide and narrow layers alike."""
    torch.manual_seed(0)
    layer = BlockdiagLinear(n_in, n_out, nblocks=4, bias=False)
    bound = 1.0 / (n_in // 4) ** 0.5
    assert layer.weight.abs().max().item() <= bound
    assert layer.weight.abs().max().item() > 0.95 * bound  # thousands of draws reach the bound
    x = torch.randn(2048, n_in)
    dense = nn.Linear(n_in, n_out, bias=False)(x).var().item()
    assert layer(x).var().item() == pytest.approx(dense, rel=0.15)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("n_in,n_out", [(64, 1024), (1024, 64)])
def test_bias_init_is_nn_linear_default(cls, n_in, n_out):
    """The bias is U(±1/√in_features), like nn.Linear (not fly's U(±1/√out_features))."""
    torch.manual_seed(0)
    bias = cls(n_in, n_out, nblocks=4).bias.detach()
    bound = 1.0 / n_in ** 0.5
    assert bias.abs().max().item() <= bound
    assert bias.abs().max().item() > 0.8 * bound
    assert bias.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.25)


def test_to_fly_state_dict_with_model_renames_only_monarch_keys():
    """With ``model`` given, only MonarchLinear's ``w1``/``w2`` become ``blkdiag1``/``blkdiag2``; another module's
    parameters that happen to be called ``w1``/``w2`` keep their names."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4))
            self.w2 = nn.Parameter(torch.randn(4))

    model = nn.Sequential(MonarchLinear(16, 16, nblocks=4), Gate())
    fly = to_fly_state_dict(model.state_dict(), model)
    assert set(fly) == {"0.blkdiag1", "0.blkdiag2", "0.bias", "1.w1", "1.w2"}
    assert torch.equal(fly["1.w1"], model[1].w1) and torch.equal(fly["0.blkdiag1"], model[0].w1)
