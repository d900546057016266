"""Structured layers with a fused activation (``activation=``), ``to_dense``, and ``fuse_activations`` /
``densify`` on ``nn.Sequential`` models."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
from monarch_kernels.layers import (BlockdiagLinear, FusedActivation, MonarchLinear, densify, fuse_activations,
                                    monarchify)

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def _layer(kind, n_in, n_out, bias, act, backend):
    torch.manual_seed(0)
    cls = MonarchLinear if kind == "monarch" else BlockdiagLinear
    return cls(n_in, n_out, bias=bias, nblocks=4, activation=act, backend=backend)


@pytest.mark.parametrize("kind", ["monarch", "blockdiag"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("n_in,n_out,bias", [(32, 48, True), (30, 22, False)])
def test_forward_and_gradients_equal_the_unfused_activation(kind, act, backend, n_in, n_out, bias):
    fused = _layer(kind, n_in, n_out, bias, act, backend)
    plain = _layer(kind, n_in, n_out, bias, None, backend)  # same seed: same parameters
    x = torch.randn(3, 5, n_in, requires_grad=True)
    y = fused(x)
    want = ACTS[act](plain(x))
    # float64 reference of the whole map from the dense weight
    ref = ACTS[act](x.detach().double() @ plain.dense_weight().detach().double().T
                    + (plain.bias.detach().double() if bias else 0))
    assert rel_err(y, ref) < 1e-5
    # an infinite input: the unfused map's inf/NaN pattern (float64; torch's vectorised fp32 CPU erf-GELU
    # gives NaN at +inf where its float64 path, CUDA and the kernels give +inf)
    x_inf = x.detach().clone()
    x_inf[0, 0, 0] = float("inf")
    plain64 = copy.deepcopy(plain).double()
    plain64.backend = "torch"
    want_inf = ACTS[act](plain64(x_inf.double())).detach()
    got_inf = fused(x_inf).detach()
    assert not torch.isfinite(want_inf).all()
    if act == "gelu":
        got_inf = torch.where(torch.isposinf(want_inf) & torch.isnan(got_inf), float("inf"), got_inf)
    assert rel_err(got_inf, want_inf) < 1e-5
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, [x, *fused.parameters()], g)
    exp = torch.autograd.grad(want, [x, *plain.parameters()], g)
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_bad_activation_is_refused_with_its_name(cls):
    with pytest.raises(ValueError, match="activation"):
        cls(16, 16, nblocks=4, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        cls(16, 16, nblocks=4, activation=nn.GELU())


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_to_linear_refuses_an_activation_and_to_dense_keeps_it(cls):
    layer = cls(24, 40, nblocks=4, activation="gelu", dtype=torch.float64)
    assert "activation='gelu'" in repr(layer)
    with pytest.raises(ValueError, match="to_dense"):
        layer.to_linear()
    dense = layer.to_dense()
    assert isinstance(dense, nn.Sequential) and isinstance(dense[0], nn.Linear) and isinstance(dense[1], nn.GELU)
    x = torch.randn(7, 24, dtype=torch.float64)
    assert rel_err(dense(x), layer(x)) < 1e-12
    plain = cls(24, 40, nblocks=4, dtype=torch.float64)
    assert "activation" not in repr(plain) and type(plain.to_dense()) is nn.Linear


def test_from_linear_with_an_activation():
    torch.manual_seed(1)
    linear = nn.Linear(32, 64)
    fused = MonarchLinear.from_linear(linear, 4, activation="gelu_tanh")
    plain = MonarchLinear.from_linear(linear, 4)
    x = torch.randn(6, 32)
    assert fused.activation == "gelu_tanh"
    assert torch.allclose(fused(x), F.gelu(plain(x), approximate="tanh"), atol=1e-6)
    block = BlockdiagLinear.from_dense(linear.weight, linear.bias, 4, activation="relu")
    assert torch.equal(block(x), F.relu(BlockdiagLinear.from_dense(linear.weight, linear.bias, 4)(x)))


def _dense_mlp():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(),
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True)),
        nn.Linear(64, 32), nn.GELU(approximate="tanh"),
        nn.ReLU(),  # after an activation, not a layer
        nn.Linear(32, 16),
    )


def test_fuse_activations_keeps_the_map_and_the_keys_and_densify_restores_the_model():
    model = _dense_mlp()
    monarchify(model, nblocks=4)
    x = torch.randn(9, 32)
    before, keys = model(x), list(model.state_dict())
    fused = fuse_activations(model)
    assert sorted(fused) == ["0", "2.0", "3"]
    assert [model[0].activation, model[2][0].activation, model[3].activation] == ["gelu", "relu", "gelu_tanh"]
    assert isinstance(model[1], FusedActivation) and isinstance(model[4], FusedActivation)
    assert type(model[5]) is nn.ReLU and model[6].activation == "none"  # nothing to fold into
    assert list(model.state_dict()) == keys
    assert rel_err(model(x), before) < 1e-6
    assert fuse_activations(model) == []  # already fused: nothing more
    densify(model)
    want = _dense_mlp()
    assert [type(m) for m in model.modules()] == [type(m) for m in want.modules()]
    assert model[4].approximate == "tanh" and model[2][1].inplace
    assert rel_err(model(x), before) < 1e-5


def test_fuse_activations_follows_the_dataflow_of_custom_forwards():
    """A custom ``forward`` that applies the activation to the layer's output alone is fused (torch.fx trace of
    the parent); a residual use of the layer's output, a layer shared by two paths, an ``nn.GELU`` subclass and
    an untraceable ``forward`` are left alone; densify restores the activations."""
    class GeluSubclass(nn.GELU):
        pass

    class Block(nn.Module):  # the order lives in forward, not in the module tree
        def __init__(self):
            super().__init__()
            self.fc, self.act = MonarchLinear(16, 16, nblocks=4), nn.GELU(approximate="tanh")

        def forward(self, x):
            return self.act(self.fc(x))

    class Residual(Block):
        def forward(self, x):
            h = self.fc(x)
            return self.act(h) + h  # the pre-activation is used again: no fusion

    class Branchy(Block):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: fx cannot trace it
                return self.act(self.fc(x))
            return self.fc(x)

    shared = MonarchLinear(16, 16, nblocks=4)
    model = nn.Sequential(shared, nn.ReLU(), shared, MonarchLinear(16, 16, nblocks=4), GeluSubclass(), Block(),
                          Residual(), Branchy())
    x = torch.randn(4, 16)
    before = model(x)
    assert fuse_activations(model) == ["5.fc"]
    assert model[5].fc.activation == "gelu_tanh" and isinstance(model[5].act, FusedActivation)
    assert model[5].act.into == "fc" and "into='fc'" in repr(model[5].act)
    assert shared.activation == "none" and type(model[1]) is nn.ReLU and type(model[4]) is GeluSubclass
    assert model[6].fc.activation == "none" and model[7].fc.activation == "none"
    assert rel_err(model(x), before) < 1e-6
    densify(model)
    assert type(model[5].act) is nn.GELU and model[5].act.approximate == "tanh" and type(model[5].fc) is nn.Linear
    assert rel_err(model(x), before) < 1e-5
    with pytest.raises(TypeError, match="model"):
        fuse_activations("not a model")


def test_fuse_activations_in_hugging_face_gpt2():
    """GPT-2's MLP (``act(c_fc(h))`` in its forward, ``gelu_new`` = the tanh GELU): after monarchify, each
    ``c_fc`` takes the activation; the logits and the state-dict keys do not change; densify gives back
    ``Conv1D`` and ``NewGELUActivation``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    monarchify(model, nblocks=4, include=["**.mlp.*"])
    ids = torch.randint(0, 64, (2, 10))
    before, keys = model(ids).logits, list(model.state_dict())
    assert fuse_activations(model) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert model.transformer.h[0].mlp.c_fc.activation == "gelu_tanh"
    assert list(model.state_dict()) == keys
    assert rel_err(model(ids).logits, before) < 1e-5
    densify(model)
    mlp = model.transformer.h[1].mlp
    assert type(mlp.act).__name__ == "NewGELUActivation" and type(mlp.c_fc).__name__ == "Conv1D"
    assert rel_err(model(ids).logits, before) < 1e-5


def test_densify_of_a_layer_built_with_an_activation():
    model = nn.Sequential(MonarchLinear(16, 24, nblocks=4, activation="relu", dtype=torch.float64))
    x = torch.randn(5, 16, dtype=torch.float64)
    before = model(x)
    assert densify(model) == ["0"]
    assert isinstance(model[0], nn.Sequential) and type(model[0][1]) is nn.ReLU
    assert rel_err(model(x), before) < 1e-12
