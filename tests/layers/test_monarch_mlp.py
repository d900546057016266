"""MonarchMLP: the two layers' values and gradients, the fused hidden layer on the Triton backend (interpreter)
forward and in training, ragged widths, from_layers and its checks."""
import pytest
import torch

import monarch_kernels as mk
from conftest import RTOL, rel_err
from monarch_kernels.layers import MonarchLinear, MonarchMLP


def _layers(mlp, x):
    return mlp.fc2(mlp.fc1(x))


@pytest.mark.parametrize("widths", [(64, 256, None), (60, 250, 50)], ids=["whole-blocks", "ragged"])
def test_values_and_gradients_are_the_layers(widths):
    """fp32 on CPU (not fused): exactly fc2(fc1(x)), forward and every gradient; ragged widths (inputs narrower
    than the blocks, a truncated hidden activation re-padded for fc2, a truncated output)."""
    torch.manual_seed(0)
    n_in, n_h, n_out = widths
    mlp = MonarchMLP(n_in, n_h, n_out, nblocks=4)
    assert mlp.fc1.activation == "gelu" and mlp.fc2.activation == "none"
    x = torch.randn(3, 7, n_in, requires_grad=True)
    out = mlp(x)
    assert out.shape == (3, 7, n_in if n_out is None else n_out)
    want = _layers(mlp, x)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], g)
    wants = torch.autograd.grad(want, [x, *mlp.parameters()], g)
    for a, b in zip(grads, wants):
        assert torch.equal(a, b)


@pytest.mark.skipif(mk.available_backends()["triton"] != "available", reason="needs the Triton interpreter")
def test_inference_on_triton_runs_the_fused_hidden_layer(monkeypatch):
    from monarch_kernels.triton import mlp as tmlp

    calls = []
    original = tmlp.hidden_layer
    monkeypatch.setattr(tmlp, "hidden_layer", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
    mlp = MonarchMLP(64, 256, nblocks=4, activation="relu", backend="triton", dtype=torch.bfloat16, device=device)
    x = torch.randn(50, 64, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        out = mlp(x)
        want = _layers(mlp, x)
    assert calls == [1] and rel_err(out, want) < RTOL[torch.bfloat16]


@pytest.mark.skipif(mk.available_backends()["triton"] != "available", reason="needs the Triton interpreter")
def test_training_on_triton_runs_the_fused_backward(monkeypatch):
    """A training step of the layer on Triton: the fused hidden-layer backward runs once, and every parameter's
    gradient is the two layers' (the same roundings)."""
    from monarch_kernels.triton import mlp as tmlp

    calls = []
    original = tmlp.hidden_layer_backward
    monkeypatch.setattr(tmlp, "hidden_layer_backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mlp = MonarchMLP(64, 256, nblocks=4, backend="triton", dtype=torch.bfloat16, device=device)
    x = torch.randn(2, 20, 64, dtype=torch.bfloat16, device=device)
    g = torch.randn(2, 20, 64, dtype=torch.bfloat16, device=device)
    grads = torch.autograd.grad(mlp(x), list(mlp.parameters()), g)
    wants = torch.autograd.grad(_layers(mlp, x), list(mlp.parameters()), g)
    assert calls == [1]
    for a, b in zip(grads, wants):
        assert rel_err(a, b) < RTOL[torch.bfloat16]


def test_from_layers_shares_them_and_checks_they_compose():
    fc1 = MonarchLinear(32, 128, nblocks=4, activation="gelu_tanh")
    fc2 = MonarchLinear(128, 32, nblocks=4)
    mlp = MonarchMLP.from_layers(fc1, fc2)
    assert mlp.fc1 is fc1 and mlp.fc2 is fc2 and len(list(mlp.parameters())) == 6
    x = torch.randn(5, 32)
    assert torch.equal(mlp(x), fc2(fc1(x)))
    with pytest.raises(ValueError, match="in_features"):
        MonarchMLP.from_layers(fc1, MonarchLinear(64, 32, nblocks=4))
    with pytest.raises(ValueError, match="activation"):
        MonarchMLP.from_layers(fc1, MonarchLinear(128, 32, nblocks=4, activation="relu"))
    with pytest.raises(ValueError, match="backends"):
        MonarchMLP.from_layers(fc1, MonarchLinear(128, 32, nblocks=4, backend="torch"))
    with pytest.raises(TypeError, match="MonarchLinear"):
        MonarchMLP.from_layers(fc1, torch.nn.Linear(128, 32))
    with pytest.raises(ValueError, match="last dimension"):
        mlp(torch.randn(5, 31))
