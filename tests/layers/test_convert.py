"""monarchify / densify on models built from plain torch modules: selection rules, safety skips, dry-run plans,
errors, projection by default, type-restoring densify, and drop-in training."""
import copy
import warnings

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
    names = monarchify(model, nblocks=4, include=["mlp.*", "c_fc"])  # projection is the default
    assert names == ["mlp.0", "mlp.2", "c_fc"]
    assert all(isinstance(model.get_submodule(n), MonarchLinear) for n in names)
    assert [r.init for r in names.layers] == ["projected"] * 3 and all(r.error < 1e-12 for r in names.layers)
    assert isinstance(model.embed, nn.Linear) and isinstance(model.head, nn.Linear)
    assert rel_err(model(x), before) < 1e-12
    assert densify(model) == names
    assert [type(model.get_submodule(n)) for n in names] == [nn.Linear, nn.Linear, Conv1D]  # original classes
    assert model.c_fc.weight.shape == (32, 48)  # Conv1D stores (in, out)
    assert rel_err(model(x), before) < 1e-12


def test_project_false_reinitialises():
    model = Tiny().double()
    _monarch_structured_(model, 4)
    x = torch.randn(5, 8, dtype=torch.float64)
    before = model(x)
    conv = monarchify(model, nblocks=4, include=["mlp.*", "c_fc"], project=False)
    assert [r.init for r in conv.layers] == ["random"] * 3 and all(r.error is None for r in conv.layers)
    assert rel_err(model(x), before) > 0.1


def test_monarchify_filters_and_threshold():
    model = Tiny()
    with pytest.raises(ValueError, match=r"nothing to convert \(.*mlp.0: min\(in, out\) = 32 < min_features = 33"):
        monarchify(model, nblocks=4, exclude=["head", "embed"], min_features=33)
    assert monarchify(model, nblocks=4, exclude=["head", "embed"], min_features=32) == ["mlp.0", "mlp.2", "c_fc"]
    model = Tiny()
    names = monarchify(model, nblocks=4, exclude="head", layer="blockdiag")
    assert names == ["embed", "mlp.0", "mlp.2", "c_fc"] and names.skipped == {"head": "excluded"}
    assert isinstance(model.embed, BlockdiagLinear)
    with pytest.raises(ValueError, match="layer must be 'monarch' or 'blockdiag'"):
        monarchify(model, layer="butterfly")
    with pytest.raises(TypeError, match="module-path pattern"):
        monarchify(Tiny(), include=[3])
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        monarchify(Tiny(), nblocks=0)


def test_patterns_that_match_nothing_raise():
    with pytest.raises(ValueError, match=r"include pattern 'mlp.9' matches no dense layer.*dense layers: embed, mlp.0"):
        monarchify(Tiny(), include=["mlp.*", "mlp.9"])
    with pytest.raises(ValueError, match="exclude pattern 'haed' matches no dense layer"):
        monarchify(Tiny(), exclude="haed")
    with pytest.raises(ValueError, match="has no nn.Linear or Conv1D layer"):
        monarchify(nn.Sequential(nn.ReLU()))


def test_nblocks_that_does_not_fit():
    model = Tiny()  # head is 48 -> 3
    with pytest.raises(ValueError, match=r"nblocks=4 does not fit head \(48 -> 3\)"):
        monarchify(model, nblocks=4, include=["head"])  # named: an error
    conv = monarchify(model, nblocks=4)  # matched by the default wildcard: skipped and reported
    assert conv.skipped == {"head": "nblocks=4 > min(in, out) = 3"}
    with pytest.raises(ValueError, match=r"nothing to convert \(embed: nblocks=16 > min\(in, out\) = 8"):
        monarchify(Tiny(), nblocks=16, include="e*")


class Layer(nn.Module):
    """A BERT-like layer: the attention output and the FFN output are both called ``output.dense``."""

    def __init__(self, d=16):
        super().__init__()
        self.attention = nn.Module()
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, 2 * d)
        self.output = nn.Module()
        self.output.dense = nn.Linear(2 * d, d)

    def forward(self, x):
        h = x + self.attention.output.dense(x)
        return h + self.output.dense(torch.relu(self.intermediate.dense(h)))


class Encoder(nn.Module):
    def __init__(self, n=3, d=16, vocab=20):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in GPT-2 / BERT MLM heads

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.encoder.layer:
            h = layer(h)
        return self.lm_head(h)


def test_star_stays_in_one_segment_and_double_star_crosses():
    assert monarchify(Encoder(), include="encoder.layer.*.output.dense", dry_run=True) == [
        f"encoder.layer.{i}.output.dense" for i in range(3)]
    both = monarchify(Encoder(), include="**.output.dense", dry_run=True)
    assert len(both) == 6 and "encoder.layer.0.attention.output.dense" in both
    assert monarchify(Encoder(), include="encoder.layer.1.**", dry_run=True) == [
        "encoder.layer.1.attention.output.dense", "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    with pytest.raises(ValueError, match=r"include pattern '\*.output.dense' matches no dense layer"):
        monarchify(Encoder(), include="*.output.dense")


def test_tied_output_head_is_skipped_unless_named():
    model = Encoder()
    with pytest.warns(UserWarning, match=r"unsafe.*lm_head \(output head.*weight tied to embed"):
        conv = monarchify(model, nblocks=4)
    assert "lm_head" not in conv and conv.skipped["lm_head"].startswith("output head")
    assert model.lm_head.weight is model.embed.weight and len(conv) == 9
    named = Encoder()
    with pytest.warns(UserWarning, match="converting named layers although unsafe: lm_head"):
        assert monarchify(named, nblocks=4, include=["lm_head"]) == ["lm_head"]
    assert isinstance(named.lm_head, MonarchLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluding the head explicitly: no warning
        monarchify(Encoder(), nblocks=4, exclude="lm_head")


def test_shared_module_is_replaced_everywhere_when_named():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 16))
    with pytest.warns(UserWarning, match=r"0 \(module shared with 2\)"):
        assert monarchify(copy.deepcopy(model), nblocks=4) == ["3"]
    with pytest.warns(UserWarning, match="converting named layers although unsafe"):
        monarchify(model, nblocks=4, include=["0", "3"])
    assert isinstance(model[0], MonarchLinear) and model[0] is model[2]


def test_transformer_encoder_layer_parents_that_read_weight_are_skipped():
    """Reliability D9: MultiheadAttention reads out_proj.weight and TransformerEncoderLayer's inference fast path
    reads linear1/linear2.weight; converting them crashed forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                          nn.Linear(32, 32)).eval()
    x = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match=r"0.self_attn.out_proj \(MultiheadAttention reads self.out_proj.weight"):
        conv = monarchify(model, nblocks=4)
    assert conv == ["1"]
    assert set(conv.skipped) == {"0.self_attn.out_proj", "0.linear1", "0.linear2"}
    assert "TransformerEncoderLayer reads self.linear1.weight directly" in conv.skipped["0.linear1"]
    assert model(x).shape == (2, 5, 32) and model.train()(x).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="nothing to convert.*out_proj: MultiheadAttention reads"):
        monarchify(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True))


def test_dry_run_plan_matches_the_conversion():
    model = Encoder()
    before = [id(m) for m in model.modules()]
    plan = monarchify(model, nblocks=4, include="encoder.layer.*.*.dense", dry_run=True)
    assert [id(m) for m in model.modules()] == before and plan.dry_run  # untouched
    assert plan == [f"encoder.layer.{i}.{n}.dense" for i in range(3) for n in ("intermediate", "output")]
    done = monarchify(model, nblocks=4, include="encoder.layer.*.*.dense")
    for row, name in zip(plan.layers, done):
        layer = model.get_submodule(name)
        assert row.name == name and (row.in_features, row.out_features) == (layer.in_features, layer.out_features)
        assert row.new_params == sum(p.numel() for p in layer.parameters())
        assert row.params == row.in_features * row.out_features + row.out_features
        assert row.new_flops == layer.flops_per_token() and row.flops == layer.dense_flops_per_token()
        assert row.error is None
    assert done.params == plan.params and done.flops == plan.flops
    text = str(done)
    assert "encoder.layer.0.intermediate.dense  Linear 16->32  monarch/4" in text
    assert f"total (6 converted)" in text and "skipped" not in text
    assert "total (6 would convert)" in str(plan)


def test_verbose_prints_the_table(capsys):
    monarchify(Tiny(), nblocks=4, include="mlp.*", verbose=True)
    out = capsys.readouterr().out
    assert "mlp.0" in out and "total (2 converted)" in out


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
    with pytest.warns(UserWarning, match="converting named layers although unsafe: block.linear1"):
        names = monarchify(model, nblocks=4, include=["block.linear1", "block.linear2"])  # train mode only
    assert names == ["block.linear1", "block.linear2"]
    losses = _train(model, seq, target, steps=80)
    assert losses[-1] < 0.5 * losses[0]


def test_nblocks_equal_to_min_features_is_converted():
    """nblocks == min(in, out) is a valid MonarchLinear (one input or output per block): such a layer is converted,
    not skipped, and projecting an exactly Monarch weight keeps the model's outputs (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    with torch.no_grad():
        model[0].weight.copy_(MonarchLinear(4, 32, nblocks=4, dtype=torch.float64).dense_weight())
        model[2].weight.copy_(MonarchLinear(32, 4, nblocks=4, dtype=torch.float64).dense_weight())
    x = torch.randn(5, 4, dtype=torch.float64)
    before = model(x)
    conv = monarchify(model, nblocks=4)
    assert conv == ["0", "2"] and conv.skipped == {}
    assert isinstance(model[0], MonarchLinear) and isinstance(model[2], MonarchLinear)
    assert rel_err(model(x), before) < 1e-12


def test_plan_counts_a_bias_only_where_there_is_one():
    """Per-layer parameter counts (before and after) include the bias only for layers that have one, and match
    the modules' actual parameter counts."""
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 16))
    dense_params = [sum(p.numel() for p in model[i].parameters()) for i in (0, 2)]
    conv = monarchify(model, nblocks=4)
    assert [r.bias for r in conv.layers] == [False, True]
    assert [r.params for r in conv.layers] == dense_params == [16 * 32, 32 * 16 + 16]
    assert [r.new_params for r in conv.layers] == [sum(p.numel() for p in model[i].parameters()) for i in (0, 2)]


class _ReadsBias(nn.Module):
    """A parent that reads ``self.proj.bias`` directly (besides calling ``self.proj``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.proj(x) - self.proj.bias)


def test_parent_reading_child_bias_is_unsafe():
    """Rule 4 covers ``.bias`` as well as ``.weight``: a wildcard leaves such a child dense (with a warning)."""
    model = _ReadsBias()
    with pytest.warns(UserWarning, match=r"proj \(_ReadsBias reads self.proj"):
        conv = monarchify(model, nblocks=4)
    assert conv == ["out"] and "proj" in conv.skipped and isinstance(model.proj, nn.Linear)
