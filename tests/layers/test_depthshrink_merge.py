"""DepthShrinker layers: exact block merge (incl. borders), zero-padding converter, chained kernels, search gate."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monarch_kernels.layers import MonarchLinear
from monarch_kernels.layers.depthshrinker import (
    MBV2_MINI_BLOCKS,
    BiasMapConv2d,
    MobileNetV2Mini,
    PointwiseConv,
    ShrinkableInvertedResidual,
    ShrinkGate,
    compose_convs,
    count_layers,
    depthshrink,
    capped_simplex_projection,
    merge_zero_padded,
    project_scores,
    removal_count,
    set_relaxed,
    set_removed,
    set_search,
    shrink_blocks,
    topk_keep,
    update_search_flags,
)


def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Random running stats and affine parameters so that BN folding is actually exercised."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)


def make_block(cin, cout, s, k, t, pw, padding="pad_first", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    b = ShrinkableInvertedResidual(cin, cout, s, t, k, pointwise=pw, padding=padding).to(dtype)
    randomize_bn(b, torch.Generator().manual_seed(seed))
    b.eval()
    b.gate.mode = "remove"
    return b


CASES = [  # (cin, cout, stride, k, expand, pointwise): residual iff stride 1 and cin == cout
    (cin, cout, s, k, t, pw)
    for (cin, cout), s, k, t, pw in itertools.product([(8, 8), (8, 12)], [1, 2], [3, 5], [1, 4], ["dense", "monarch"])
]


@pytest.mark.parametrize("cin,cout,s,k,t,pw", CASES)
def test_merge_exact_everywhere_fp32(cin, cout, s, k, t, pw):
    b = make_block(cin, cout, s, k, t, pw)
    assert b.use_residual == (s == 1 and cin == cout)
    assert (b.pw1 is None) == (t == 1)
    x = torch.randn(2, cin, 11, 10)
    with torch.no_grad():
        y = b(x)
        conv = b.merge()
        z = conv(x)
    assert isinstance(conv, nn.Conv2d) and conv.groups == 1
    assert conv.kernel_size == (k, k) and conv.stride == (s, s) and conv.padding == (k // 2, k // 2)
    assert z.shape == y.shape
    assert (z - y).abs().max().item() <= 1e-5  # every position, border ring included
    assert sum(p.numel() for p in conv.parameters()) == b.merged_param_count() == cin * cout * k * k + cout


@pytest.mark.parametrize("s,k", [(1, 3), (2, 5)])
def test_merge_exact_float64_and_border_ring(s, k):
    b = make_block(8, 8 if s == 1 else 12, s, k, 3, "monarch", dtype=torch.float64)
    x = torch.randn(3, 8, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        err = (b.merge()(x) - b(x)).abs()
    assert err.max().item() < 1e-12
    ring = err.clone()
    ring[..., 1:-1, 1:-1] = 0
    assert ring.max().item() < 1e-12


@pytest.mark.parametrize("s,k", [(1, 3), (1, 5), (2, 3)])
def test_zero_padding_pitfall_and_bias_map_converter(s, k):
    """A zero-padded block differs from the plain merge on the border ring only; the bias map makes it exact."""
    zb = make_block(8, 8 if s == 1 else 12, s, k, 4, "dense", padding="zeros", dtype=torch.float64)
    pf = make_block(8, 8 if s == 1 else 12, s, k, 4, "dense", padding="pad_first", dtype=torch.float64)
    pf.load_state_dict(zb.state_dict())  # same weights, pad-first semantics
    with pytest.raises(ValueError, match="merge_zero_padded"):
        zb.merge()
    plain = pf.merge()  # the naive merge ignores where the padding sits
    H, W = 13, 10
    x = torch.randn(2, 8, H, W, dtype=torch.float64)
    with torch.no_grad():
        y = zb(x)
        err = (plain(x) - y).abs()
        conv = merge_zero_padded(zb, (H, W))
        z = conv(x)
    border = max(1, (k // 2 + s - 1) // s)  # outputs whose DW window touches the padding
    assert err[..., border:-border, border:-border].max().item() < 1e-12  # interior agrees
    assert err.max().item() > 1e-3  # the border ring does not
    assert isinstance(conv, BiasMapConv2d) and conv.bias_map.shape == y.shape[1:]
    assert (z - y).abs().max().item() < 1e-12  # converter: exact everywhere for its input size
    with pytest.raises(ValueError, match="13, 10"):
        conv(torch.randn(1, 8, 12, 10, dtype=torch.float64))


def test_zero_padding_converter_fp32_monarch():
    b = make_block(8, 12, 2, 5, 4, "monarch", padding="zeros")
    x = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        assert (merge_zero_padded(b, (14, 14))(x) - b(x)).abs().max().item() <= 1e-5


def test_pointwise_monarch_is_channel_linear():
    pw = PointwiseConv(8, 12, "monarch", nblocks=4, bias=True)
    assert isinstance(pw.linear, MonarchLinear)
    x = torch.randn(2, 8, 5, 6)
    ref = F.conv2d(x, pw.weight_matrix()[:, :, None, None], pw.bias)
    assert torch.allclose(pw(x), ref, atol=1e-6)


def test_chained_merge_kernel_size_and_values():
    """3×3 then 5×5 (stride 1) → 7×7; stride 2 first: d = d1 + s1 (d2 − 1) = 11, stride 2, padding p1 + s1 p2."""
    torch.manual_seed(0)
    b1 = make_block(8, 8, 1, 3, 4, "dense", dtype=torch.float64, seed=1)
    b2 = make_block(8, 12, 1, 5, 4, "monarch", dtype=torch.float64, seed=2)
    c = compose_convs(b1.merge(), b2.merge())
    assert c.kernel_size == (7, 7) and c.stride == (1, 1) and c.padding == (3, 3)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y, z = b2(b1(x)), c(x)
        # b2 pads b1's output with zeros; the composed conv extends b1 over the padded input: equal inside
        assert (y - z)[..., 2:-2, 2:-2].abs().max().item() < 1e-12
        assert (y - z).abs().max().item() > 1e-6
        # with all padding on the chain input the composition is exact everywhere
        m1, m2 = b1.merge(), b2.merge()
        xp = F.pad(x, (3, 3, 3, 3))
        yv = F.conv2d(F.conv2d(xp, m1.weight, m1.bias), m2.weight, m2.bias)
        assert (F.conv2d(xp, c.weight, c.bias) - yv).abs().max().item() < 1e-12
    s2 = compose_convs(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 5, 5, 1, 2))
    assert s2.kernel_size == (11, 11) and s2.stride == (2, 2) and s2.padding == (5, 5)
    with pytest.raises(ValueError, match="in_channels"):
        compose_convs(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 5, 3))


def test_gate_straight_through_values_and_score_gradient():
    g = ShrinkGate()
    x = torch.linspace(-3, 9, 25)
    g.mode = "search"
    with torch.no_grad():
        g.score.fill_(0.3)
    for removed in (False, True):
        g.removed.fill_(removed)
        g.score.grad = None
        y = g(x)
        assert torch.equal(y, x if removed else F.relu6(x))  # hard values
        y.sum().backward()
        assert torch.allclose(g.score.grad, (x - F.relu6(x)).sum())  # ∂y/∂s = x − σ(x)
    with torch.no_grad():
        g.score.fill_(-0.1)  # outside [0, 1]: the clamp passes no gradient
    g.score.grad = None
    g(x).sum().backward()
    assert g.score.grad.item() == 0
    g.mode = "relax"  # the learned slope: value σ + clamp(s)(x − σ), the same score gradient
    for s in (0.0, 0.3, 1.0):
        with torch.no_grad():
            g.score.fill_(s)
        g.score.grad = None
        y = g(x)
        assert torch.allclose(y, F.relu6(x) + s * (x - F.relu6(x)))
        y.sum().backward()
        assert torch.allclose(g.score.grad, (x - F.relu6(x)).sum())
    g.mode = "keep"
    assert torch.equal(g(x), F.relu6(x))
    g.mode = "remove"
    assert torch.equal(g(x), x) and g.is_linear
    g.slope = 0.5
    assert torch.allclose(g(x), F.relu6(x) + 0.5 * (x - F.relu6(x))) and not g.is_linear
    with pytest.raises(ValueError, match="mode"):
        g.mode = "off"


def test_gate_mode_survives_state_dict():
    a, b = ShrinkGate(), ShrinkGate()
    a.mode = "remove"
    a.slope = 0.25
    state = a.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())  # tensors only (safetensors, weights_only)
    b.load_state_dict(state)
    assert b.mode == "remove" and b.slope == 0.25 and not b.is_linear
    state["mode_code"] = torch.tensor(9, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mode_code"):
        b.load_state_dict(state)
    with pytest.raises(ValueError, match="slope"):
        b.slope = 1.5


def test_safetensors_round_trip_every_gate_mode(tmp_path):
    """Regression (issue 18, D10): a network of shrinkable blocks saves to safetensors and loads back with the
    same gate modes, slopes, search flags and scores, giving identical outputs; ``torch.load(weights_only=True)``
    works too."""
    st = pytest.importorskip("safetensors.torch")

    def build():
        torch.manual_seed(0)
        return TinyNet()

    net = build()
    randomize_bn(net, torch.Generator().manual_seed(1))
    g0, g1, g2 = (b.gate for b in shrink_blocks(net))
    g0.mode, g0.slope = "remove", 0.5  # a DECAY_SLOPE ramp midway
    g1.mode = "search"
    g1.removed.fill_(True)
    g2.mode = "relax"
    with torch.no_grad():
        for g, s in zip((g0, g1, g2), (0.1, 0.4, 0.7)):
            g.score.fill_(s)
    net.eval()
    x = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        y = net(x)
    st.save_model(net, str(tmp_path / "net.safetensors"))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    for load in (lambda m: st.load_model(m, str(tmp_path / "net.safetensors")),
                 lambda m: m.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))):
        fresh = build()
        assert [b.gate.mode for b in shrink_blocks(fresh)] == ["keep"] * 3
        load(fresh)
        fresh.eval()
        assert [b.gate.mode for b in shrink_blocks(fresh)] == ["remove", "search", "relax"]
        assert [b.gate.slope for b in shrink_blocks(fresh)] == [0.5, 1.0, 1.0]
        assert [bool(b.gate.removed) for b in shrink_blocks(fresh)] == [False, True, False]
        with torch.no_grad():
            assert torch.equal(fresh(x), y)


def test_topk_keep_smallest_scores():
    removed = topk_keep(torch.tensor([0.9, 0.1, 0.5, 0.0, 0.7]), 0.4)  # keep ⌊0.4·5⌋ = 2 smallest
    assert removed.tolist() == [True, False, True, False, True]
    assert topk_keep(torch.zeros(4), 0.5).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="keep_ratio"):
        topk_keep(torch.zeros(3), 1.5)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            ShrinkableInvertedResidual(8, 8, 1, 1, 3, final_act=nn.ReLU6()),
            ShrinkableInvertedResidual(8, 12, 2, 4, 5, pointwise="monarch"),
            ShrinkableInvertedResidual(12, 12, 1, 4, 3, final_act=nn.ReLU6()),
        )
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_depthshrink_model_level():
    net = TinyNet()
    randomize_bn(net, torch.Generator().manual_seed(0))
    set_removed(net, [True, False, True])
    net.eval()
    x = torch.randn(4, 1, 12, 12)
    merged = depthshrink(net)
    assert len(shrink_blocks(net)) == 3 and len(shrink_blocks(merged)) == 1  # input model untouched
    assert isinstance(merged.blocks[0], nn.Sequential) and isinstance(merged.blocks[0][0], nn.Conv2d)
    assert isinstance(merged.blocks[1], ShrinkableInvertedResidual)
    with torch.no_grad():
        assert (merged(x) - net(x)).abs().max().item() <= 1e-5
    before, after = count_layers(net), count_layers(merged)
    # block 0 (DW + PW) and block 2 (PW + DW + PW) become one conv each
    assert before["conv"] == 1 + 2 + 3 + 3 and after["conv"] == 1 + 1 + 3 + 1
    assert after["depthwise"] == 1 and after["bn"] == 3


def test_search_flags_follow_scores():
    net = TinyNet()
    removed = set_search(net, 1 / 3)
    assert removed.tolist() == [False, True, True]  # ties: earlier kept
    with torch.no_grad():
        shrink_blocks(net)[2].gate.score.fill_(-1.0)
    assert update_search_flags(net, 1 / 3).tolist() == [True, True, False]
    assert [b.gate.removed.item() for b in shrink_blocks(net)] == [True, True, False]


def test_merge_requires_removed_activation_and_bad_input():
    b = ShrinkableInvertedResidual(4, 4, 1, 2, 3)
    with pytest.raises(ValueError, match="activation must be removed"):
        b.merge()
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        b(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="residual"):
        ShrinkableInvertedResidual(4, 8, 1, residual=True)
    with pytest.raises(ValueError, match="kernel_size"):
        ShrinkableInvertedResidual(4, 4, 1, kernel_size=4)
    with pytest.raises(ValueError, match="padding"):
        ShrinkableInvertedResidual(4, 4, 1, padding="reflect")
    b.gate.mode = "remove"
    with pytest.raises(ValueError, match="input_size"):
        merge_zero_padded(b, (5,))


def _block_and_its_two_outputs():
    """An eval-mode block with a ReLU6 final activation and random BN statistics, an input, and the block's output
    kept (``"keep"``) and removed (``"remove"``)."""
    torch.manual_seed(0)
    b = ShrinkableInvertedResidual(8, 8, 1, 4, 3, final_act=nn.ReLU6())
    randomize_bn(b, torch.Generator().manual_seed(0))
    b.eval()
    x = torch.randn(2, 8, 6, 7) * 3
    outs = {}
    with torch.no_grad():
        for mode in ("keep", "remove"):
            b.gate.mode = mode
            outs[mode] = b(x)
    return b, x, outs


def test_relaxed_block_interpolates_kept_and_removed():
    """A ``"relax"`` gate at slope 0 is the kept block, at 1 the removed block with its final activation."""
    b, x, outs = _block_and_its_two_outputs()
    with torch.no_grad():
        assert (outs["keep"] - outs["remove"]).abs().max() > 1e-2
        b.gate.mode = "relax"
        for s, ref in ((0.0, outs["keep"]), (1.0, outs["remove"])):
            b.gate.score.fill_(s)
            assert torch.allclose(b(x), ref, atol=1e-6)
        b.gate.score.fill_(0.5)
        mid = b(x)
    assert not torch.allclose(mid, outs["keep"]) and not torch.allclose(mid, outs["remove"])


def test_capped_simplex_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    for n, total in ((1, 1), (5, 2), (8, 4), (8, 0), (8, 8), (7, 2.5)):
        v = torch.randn(n, generator=g, dtype=torch.float64) * 2
        a = capped_simplex_projection(v, total)
        assert a.min() >= 0 and a.max() <= 1 and abs(float(a.sum()) - total) < 1e-9
        # no feasible point is closer to v: random feasible points, and the 0/1 vectors with `total` ones
        for _ in range(200):
            b = capped_simplex_projection(torch.randn(n, generator=g, dtype=torch.float64) * 3, total)
            assert (a - v).norm() <= (b - v).norm() + 1e-9
    feasible = torch.tensor([0.2, 0.9, 0.4, 0.5], dtype=torch.float64)
    assert torch.allclose(capped_simplex_projection(feasible, 2.0), feasible)  # already inside: unchanged
    assert torch.allclose(capped_simplex_projection(torch.tensor([2.0, 0.5, -1.0]), 1),
                          torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="total"):
        capped_simplex_projection(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="finite"):
        capped_simplex_projection(torch.tensor([0.0, float("nan")]), 1)


def test_relaxed_search_budget():
    net = TinyNet()
    assert removal_count(3, 1 / 3) == 2 == int(topk_keep(torch.zeros(3), 1 / 3).sum())
    scores = set_relaxed(net, 1 / 3)
    assert [b.gate.mode for b in shrink_blocks(net)] == ["relax"] * 3
    assert torch.allclose(scores, torch.full((3,), 2 / 3))
    with torch.no_grad():
        for b, s in zip(shrink_blocks(net), (1.7, 0.2, -0.4)):
            b.gate.score.fill_(s)
    projected = project_scores(net, 1 / 3)
    assert torch.allclose(projected.float(), torch.stack([b.gate.score.detach() for b in shrink_blocks(net)]))
    assert abs(float(projected.sum()) - 2) < 1e-9 and projected.min() >= 0 and projected.max() <= 1
    assert projected.tolist() == sorted(projected.tolist(), reverse=True)  # order kept
    with pytest.raises(ValueError, match="keep_ratio"):
        removal_count(3, -0.1)


def test_mobilenetv2_mini_shapes_and_bad_arguments():
    torch.manual_seed(0)
    net = MobileNetV2Mini(1, 10, pointwise="monarch")
    assert len(shrink_blocks(net)) == len(MBV2_MINI_BLOCKS)
    assert all(isinstance(b.pw2.linear, MonarchLinear) for b in shrink_blocks(net))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="blocks"):
        MobileNetV2Mini(blocks=[(3, 16, 1)])
    with pytest.raises(ValueError, match="stem_stride"):
        MobileNetV2Mini(stem_stride=3)
    with pytest.raises(ValueError, match="num_classes"):
        MobileNetV2Mini(num_classes=0)


@pytest.mark.parametrize("padding", ["pad_first", "zeros"])
def test_merge_folds_conv_biases(padding):
    """PW1 / DW / PW2 with biases (dense and Monarch pointwise): each bias passes through the BN that follows it
    (``a·b``) and on through the rest of the chain; merge (and merge_zero_padded) stay exact, float64."""
    b = make_block(8, 8, 1, 3, 4, "dense", padding=padding, dtype=torch.float64, seed=3)
    gen = torch.Generator().manual_seed(4)
    b.pw1.conv.bias = nn.Parameter(torch.randn(b.hidden_channels, generator=gen, dtype=torch.float64))
    b.dw.bias = nn.Parameter(torch.randn(b.hidden_channels, generator=gen, dtype=torch.float64))
    b.pw2 = PointwiseConv(b.hidden_channels, 8, "monarch", nblocks=4, bias=True).double()
    with torch.no_grad():
        b.pw2.linear.bias.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        y = b(x)
        merged = b.merge() if padding == "pad_first" else merge_zero_padded(b, (7, 9))
        assert (merged(x) - y).abs().max().item() < 1e-12 * y.abs().max().item()


@pytest.mark.parametrize("g1,g2,s1", [(2, 4, 1), (4, 8, 2), (1, 2, 1)])
def test_compose_convs_expands_grouped_convs(g1, g2, s1):
    """Grouped (and depthwise) convs are expanded to dense before composing: with the padding on the chain input
    (``conv2`` unpadded) the composed conv equals ``conv2 ∘ conv1`` at every output, float64."""
    torch.manual_seed(0)
    conv1 = nn.Conv2d(4, 8, 3, s1, 1, groups=g1).double()
    conv2 = nn.Conv2d(8, 8, 3, 1, 0, groups=g2).double()
    c = compose_convs(conv1, conv2)
    assert c.groups == 1
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        y, z = conv2(conv1(x)), c(x)
    assert z.shape == y.shape
    assert (z - y).abs().max().item() < 1e-12 * y.abs().max().item()


def test_search_gate_flagged_removed_applies_final_act():
    """During the hard search a block whose flag says removed is the removed block including ``final_act``
    (the network it will be fine-tuned as); a flag saying kept is the kept block."""
    b, x, ref = _block_and_its_two_outputs()
    with torch.no_grad():
        assert (ref["remove"] - F.relu6(ref["remove"])).abs().max() == 0  # final_act is active
        b.gate.mode = "search"
        for removed, mode in ((True, "remove"), (False, "keep")):
            b.gate.removed.fill_(removed)
            assert torch.equal(b(x), ref[mode]), mode


def test_set_removed_resets_a_decayed_slope():
    """set_removed fixes removed gates at slope 1 (the identity), also after a DECAY_SLOPE ramp left a smaller
    slope, so depthshrink merges them and the merged net equals the eval-mode net."""
    net = TinyNet()
    randomize_bn(net, torch.Generator().manual_seed(0))
    for blk in shrink_blocks(net):
        blk.gate.mode, blk.gate.slope = "remove", 0.5
    set_removed(net, [True, False, True])
    assert [b.gate.is_linear for b in shrink_blocks(net)] == [True, False, True]
    assert [b.gate.slope for b in shrink_blocks(net)] == [1.0, 1.0, 1.0]
    net.eval()
    merged = depthshrink(net)
    assert len(shrink_blocks(merged)) == 1
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert (merged(x) - net(x)).abs().max().item() <= 1e-5


def test_count_layers_depthwise_means_one_group_per_input_channel():
    """``depthwise`` counts convs with ``groups == in_channels`` (channel multiplier allowed) only; an ordinary
    grouped conv is a conv but not depthwise."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=8), nn.Conv2d(16, 16, 3, groups=2),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU6())
    assert count_layers(model) == {"conv": 4, "depthwise": 2, "linear": 0, "bn": 1, "act": 1}
