"""monarchify / densify on models built from plain torch modules, and drop-in training."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, densify, monarchify


class Conv1D(nn.Module):
    """GPT-2 style linear (``y = x @ W + b``, ``W (in, out)``), as in Hugging Face transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.c_fc = Conv1D(48, 32)
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(h)
        return self.head(torch.tanh(self.c_fc(h)))


def _monarch_structured_(model, nblocks):
    """Overwrite every targeted dense weight with an exactly Monarch-structured one."""
    with torch.no_grad():
        for name in ("mlp.0", "mlp.2", "c_fc"):
            mod = model.get_submodule(name)
            W = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()
            src = MonarchLinear(W.shape[1], W.shape[0], nblocks=nblocks, dtype=W.dtype)
            dense = src.dense_weight()
            mod.weight.copy_(dense if isinstance(mod, nn.Linear) else dense.t())


def test_monarchify_projection_keeps_outputs_and_densify_undoes():
    model = Tiny().double()
    _monarch_structured_(model, 4)
    x = torch.randn(5, 8, dtype=torch.float64)
    before = model(x)
    names = monarchify(model, nblocks=4, include=["mlp.*", "c_fc"], project=True)
    assert names == ["mlp.0", "mlp.2", "c_fc"]
    assert all(isinstance(model.get_submodule(n), MonarchLinear) for n in names)
    assert isinstance(model.embed, nn.Linear) and isinstance(model.head, nn.Linear)
    assert rel_err(model(x), before) < 1e-12
    assert densify(model) == names
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert rel_err(model(x), before) < 1e-12


def test_monarchify_filters_and_threshold():
    model = Tiny()
    assert monarchify(model, nblocks=4, exclude=["head", "embed"], min_features=33) == []  # all have min 32
    assert monarchify(model, nblocks=4, exclude=["head", "embed"], min_features=32) == ["mlp.0", "mlp.2", "c_fc"]
    model = Tiny()
    names = monarchify(model, nblocks=4, exclude="head", layer="blockdiag")
    assert names == ["embed", "mlp.0", "mlp.2", "c_fc"]
    assert isinstance(model.embed, BlockdiagLinear)
    with pytest.raises(ValueError, match="layer must be 'monarch' or 'blockdiag'"):
        monarchify(model, layer="butterfly")
    with pytest.raises(TypeError, match="glob pattern"):
        monarchify(Tiny(), include=[3])


def test_blockdiag_projection_keeps_diagonal_blocks():
    lin = nn.Linear(16, 16).double()
    with torch.no_grad():
        lin.weight.copy_(torch.block_diag(*torch.randn(4, 4, 4, dtype=torch.float64).unbind()))
    model = nn.Sequential(lin)
    x = torch.randn(3, 16, dtype=torch.float64)
    before = model(x)
    monarchify(model, nblocks=4, layer="blockdiag", project=True)
    assert rel_err(model(x), before) < 1e-12


def _train(model, x, y, steps=60, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_drop_in_mlp_trains():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = (x[:, :4].sum(-1) > 0).long() + (x[:, 4:8].sum(-1) > 0).long()
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    monarchify(model, nblocks=4, exclude="4")
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == 2
    losses = _train(model, x, y)
    assert losses[-1] < 0.5 * losses[0]


def test_drop_in_transformer_trains():
    torch.manual_seed(0)
    vocab, d, T = 16, 32, 12
    # task: predict the token at position 0 from every position (needs attention)
    seq = torch.randint(0, vocab, (64, T))
    target = seq[:, :1].expand(-1, T).reshape(-1)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
            self.block = nn.TransformerEncoderLayer(d, 4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
            self.out = nn.Linear(d, vocab)

        def forward(self, s):
            return self.out(self.block(self.emb(s) + self.pos)).reshape(-1, vocab)

    model = LM()
    names = monarchify(model, nblocks=4, include=["block.linear1", "block.linear2"])
    assert names == ["block.linear1", "block.linear2"]
    losses = _train(model, seq, target, steps=80)
    assert losses[-1] < 0.5 * losses[0]
