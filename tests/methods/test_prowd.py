"""ProWD: quantiser identities, dequantiser structure, aggregation identities, Dirichlet split, engines."""
import os

import numpy as np
import pytest
import torch

from methods import prowd
from recipe_runs import quick_run
from methods.data import dirichlet_split
from methods.prowd import (FP_BITS, ClientUpdate, ProgressiveDequantizer, ProWDServer,
                           masked_average, quant_levels, quantize, quantize_state, stochastic_quantize, swa_mask,
                           weighted_average)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantizer_levels_idempotence_and_ste(bits):
    w = torch.randn(64, 33, dtype=torch.float64)
    q = quantize(w, bits)
    assert torch.unique(q).numel() <= 2 ** bits
    s = prowd.quant_scale(w, bits)
    if bits > 1:
        # values are integer multiples of the step inside [-n_b s, n_b s]
        k = q / s
        assert torch.allclose(k, k.round(), atol=1e-9) and k.abs().max() <= quant_levels(bits) + 1e-9
        assert torch.equal(prowd.quantized_step(q, bits), s)
        assert (q - w).abs()[w.abs() <= quant_levels(bits) * s].max() <= s / 2 + 1e-12  # rounding error ≤ s/2
    assert torch.allclose(quantize(q, bits), q)  # quantising a quantised tensor changes nothing
    # STE: identity gradient inside the clipping range, zero outside
    wg = w.clone().requires_grad_(True)
    g = torch.randn_like(w)
    quantize(wg, bits, scale=s).backward(g)
    inside = w.abs() <= quant_levels(bits) * s
    assert torch.equal(wg.grad[inside], g[inside])
    assert (wg.grad[~inside] == 0).all()
    assert quantize(w, FP_BITS) is w


def test_ste_gradient_is_identity_with_max_abs_range_and_zero_when_clipped():
    w = torch.tensor([-2.0, -0.3, 0.1, 0.5, 1.0], requires_grad=True)
    quantize(w, 4, scale=torch.tensor(1.0 / 7)).sum().backward()  # range [-1, 1]: -2 is clipped
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="bits"):
        quantize(w, 0)
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.arange(3), 4)


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    w = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64)
    s = torch.tensor(0.25, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_quantize(w, 4, g, scale=s) for _ in range(4000)])
    assert torch.allclose(draws / s, (draws / s).round())
    assert (draws.mean(0) - w).abs().max() < 0.01
    st = quantize_state({"a.weight": torch.randn(8, 8), "a.bias": torch.randn(8)}, 2, torch.Generator())
    assert torch.unique(st["a.weight"]).numel() <= 4 and torch.unique(st["a.bias"]).numel() == 8  # biases stay FP


def test_dequantizer_is_identity_at_init_and_progressive():
    deq = ProgressiveDequantizer((2, 4, 8, 32), chunk=8, hidden=16, nblocks=4).double()
    w = quantize(torch.randn(5, 12, dtype=torch.float64), 2)
    assert torch.allclose(deq(w, 2), w)  # zero-initialised residual branches
    assert deq(w, 32) is w
    with torch.no_grad():
        for i, blk in enumerate(deq.blocks):
            blk.g.net[-1].bias.fill_(float(i + 1))  # block i adds (i+1) steps to every entry
    s = prowd.quantized_step(w, 2)
    assert torch.allclose(deq(w, 2), w + 6 * s)   # 2-bit input: all three blocks (1 + 2 + 3)
    w4 = quantize(torch.randn(5, 12, dtype=torch.float64), 4)
    assert torch.allclose(deq(w4, 4), w4 + 5 * prowd.quantized_step(w4, 4))  # 4-bit: blocks 2 and 3 only
    state = {"l.weight": w, "l.bias": torch.zeros(5, dtype=torch.float64)}
    out = deq.dequantize_state(state, 2)
    assert torch.allclose(out["l.weight"], w + 6 * s) and torch.equal(out["l.bias"], state["l.bias"])
    with pytest.raises(ValueError, match="chain"):
        deq(w, 3)
    with pytest.raises(ValueError, match="bit_chain"):
        ProgressiveDequantizer((4, 2, 32))


def test_dequantizer_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    model = prowd.make_client_model(16, 10, hidden=16, nblocks=4)
    fp = {n: p.detach() for n, p in model.named_parameters()}
    deq = ProgressiveDequantizer((2, 4, 32), chunk=8, hidden=16)
    opt = torch.optim.Adam(deq.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = prowd.dequantizer_loss(deq, model, fp, 2, buffer_x=torch.rand(8, 16), kd_weight=1.0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_dequantizer_loss_of_the_identity_chain_is_the_gap_between_bitwidths():
    """At init every block is the identity, so the reconstruction loss of a 2-bit input on the chain (2, 4, 32) is
    ``(mse(Q2, Q4) + mse(Q4, w) + mse(Q2, w)) / 3`` in units of each tensor's 2-bit step (stage 2→4, stage 4→32,
    end to end); biases are not dequantised."""
    torch.manual_seed(0)
    deq = ProgressiveDequantizer((2, 4, 32), chunk=8, hidden=16).double()
    g = torch.Generator().manual_seed(1)
    fp = {"a.weight": torch.randn(4, 8, generator=g, dtype=torch.float64),
          "b.weight": torch.randn(2, 8, generator=g, dtype=torch.float64) * 3,
          "b.bias": torch.randn(2, generator=g, dtype=torch.float64)}
    ws = [fp["a.weight"], fp["b.weight"]]
    steps = [prowd.quantized_step(quantize(w, 2), 2) for w in ws]

    def level(bits):
        return torch.cat([(quantize(w, bits) / s).reshape(-1) for w, s in zip(ws, steps)])

    def mse(a, b):
        return float((a - b).pow(2).mean())

    q2, q4, full = level(2), level(4), level(32)
    expected = (mse(q2, q4) + mse(q4, full) + mse(q2, full)) / 3
    loss = prowd.dequantizer_loss(deq, None, fp, 2)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)


def test_aggregation_identities():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.5])}
    same = weighted_average([a, a, a], [3, 1, 7])
    assert all(torch.allclose(same[k], a[k]) for k in a)  # FedAvg of identical clients is the identity
    avg = weighted_average([a, b], [1, 3])  # weighting by sample counts
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0])) and torch.allclose(avg["b"], torch.tensor([1.25]))
    with pytest.raises(ValueError, match="weight"):
        weighted_average([a], [1, 2])
    # masked averaging: all-ones masks = FedAvg; zero masks = the FP-only average; element-wise otherwise
    ones = masked_average([(a, 1)], [(b, 3, {"w": torch.ones(2)})])
    assert torch.allclose(ones["w"], avg["w"]) and torch.allclose(ones["b"], avg["b"])
    zeros = masked_average([(a, 1)], [(b, 3, {"w": torch.zeros(2)})])
    assert torch.allclose(zeros["w"], a["w"]) and torch.allclose(zeros["b"], avg["b"])  # masks only on weights
    mixed = masked_average([(a, 1)], [(b, 3, {"w": torch.tensor([1.0, 0.0])})])
    assert torch.allclose(mixed["w"], torch.tensor([2.5, 2.0]))


def test_swa_mask_keeps_aligned_elements():
    dh = torch.tensor([1.0, 1.0, -1.0, 0.5, -0.2])
    dl = torch.tensor([0.9, -1.0, -0.8, 0.4, 0.3])
    m = swa_mask(dl, dh)
    assert m.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]  # opposite-sign elements are dropped
    assert torch.nn.functional.cosine_similarity(m * dl, dh, 0) > torch.nn.functional.cosine_similarity(dl, dh, 0)
    assert torch.equal(swa_mask(dh, dh), torch.ones(5))  # aligned update: keep everything
    assert torch.equal(swa_mask(torch.zeros(5), dh), torch.ones(5))


def test_servers_on_identical_clients_return_the_client_model():
    torch.manual_seed(0)
    model = prowd.make_client_model(16, 10, hidden=16)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp = {n: p + 0.01 for n, p in init.items()}
    for method in prowd.METHODS:
        srv = ProWDServer(method, model, init, [2, FP_BITS], buffer_x=torch.rand(4, 16), deq_steps=1,
                          bit_chain=(2, 4, 32))
        ups = [ClientUpdate(fp, 10, FP_BITS, 0), ClientUpdate(fp, 30, FP_BITS, 1)]
        out = srv.aggregate(ups)
        assert all(torch.allclose(out[k], fp[k]) for k in fp), method
    # FedAvg of mixed clients weights by sample counts
    srv = ProWDServer("fedavg", model, init, [2, FP_BITS])
    low = quantize_state(fp, 2)
    out = srv.aggregate([ClientUpdate(fp, 10, FP_BITS, 0), ClientUpdate(low, 30, 2, 1)])
    assert all(torch.allclose(out[k], 0.25 * fp[k] + 0.75 * low[k]) for k in fp)
    grouped = ProWDServer("grouped", model, init, [2, FP_BITS])
    grouped.aggregate([ClientUpdate(fp, 10, FP_BITS, 0), ClientUpdate(low, 30, 2, 1)])
    assert all(torch.equal(grouped.payload(FP_BITS)[k], fp[k]) and torch.equal(grouped.payload(2)[k], low[k])
               for k in fp)
    with pytest.raises(ValueError, match="method"):
        ProWDServer("fedprox", model, init, [32])



def test_deq_server_averages_the_dequantised_low_bit_uploads():
    """DEQ: the global model is the sample-weighted average of the FP uploads and the *dequantised* low-bit uploads,
    dequantised by the dequantiser as trained in that round."""
    torch.manual_seed(0)
    model = prowd.make_client_model(16, 10, hidden=16)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    fp = {n: p + 0.05 * torch.randn(p.shape, generator=g) for n, p in init.items()}
    low = quantize_state({n: p + 0.05 * torch.randn(p.shape, generator=g) for n, p in init.items()}, 2)
    srv = ProWDServer("deq", model, init, [2, FP_BITS], deq_steps=2, deq_lr=1e-2,
                      bit_chain=(2, 4, 32))
    out = srv.aggregate([ClientUpdate(fp, 10, FP_BITS, 0), ClientUpdate(low, 30, 2, 1)])
    deq = srv.deq.dequantize_state(low, 2)
    assert max(float((deq[k] - low[k]).abs().max()) for k in low) > 1e-4  # the trained dequantiser is not identity
    for k in fp:
        assert torch.allclose(out[k], 0.25 * fp[k] + 0.75 * deq[k], atol=1e-6, rtol=0), k

def test_dirichlet_split_properties():
    y = torch.arange(10).repeat_interleave(60)
    parts = dirichlet_split(y, 6, 0.3, torch.Generator().manual_seed(1))
    allidx = torch.cat(parts)
    assert len(parts) == 6 and allidx.numel() == len(y) and torch.unique(allidx).numel() == len(y)  # a partition
    assert min(len(p) for p in parts) >= 2
    again = dirichlet_split(y, 6, 0.3, torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(parts, again))  # deterministic given the generator

    def skew(alpha):  # mean over clients of the largest class share
        ps = dirichlet_split(y, 6, alpha, torch.Generator().manual_seed(2))
        return np.mean([np.bincount(y[p].numpy(), minlength=10).max() / len(p) for p in ps])

    assert skew(0.1) > 0.5 > skew(1000.0) and skew(1000.0) < 0.2  # small α: label-skewed; large α: ~IID
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(y, 3, 0.0, torch.Generator())


def test_local_training_low_bit_uploads_quantised_weights():
    torch.manual_seed(0)
    model = prowd.make_client_model(16, 4, hidden=16)
    st = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.rand(20, 16), torch.randint(0, 4, (20,))
    up = prowd.local_train(model, st, x, y, 2, epochs=1, generator=torch.Generator().manual_seed(0))
    for n, p in up.items():
        if p.dim() >= 2:
            assert torch.unique(p).numel() <= 4, n
    up32 = prowd.local_train(model, st, x, y, FP_BITS, epochs=1, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(up32[n], st[n]) for n in st)


def test_quick_run(tmp_path):
    m, cfg = quick_run("prowd", tmp_path)
    s = m["summary"]
    assert set(s) == {"FedAvg", "GroupedAvg", "DEQ only", "SWA only", "ProWD"}
    for row in s.values():
        for key in ("fp32_acc", "2bit_acc", "mean_acc"):
            assert 0.2 < row[key]["mean"] <= 1.0 and row[key]["n"] == 1  # 4 rounds learn (chance: 0.1)
    assert 0.0 <= s["ProWD"]["mask_keep"]["mean"] <= 1.0 and s["ProWD"]["deq_loss"]["mean"] > 0
    # the effect's direction at this budget: ProWD's mean accuracy over both groups beats FedAvg's
    assert m["paired"]["ProWD_minus_FedAvg"]["mean_acc"]["mean"] > 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PROWD_TEST_FLOWER") != "1", reason="Ray start-up ≈ 20 s: set PROWD_TEST_FLOWER=1")
def test_flower_engine_matches_inprocess():
    fed = prowd.make_federation("digits", n_clients=3, alpha=1.0, low_bits=2, buffer_size=20, seed=0, hidden=16)
    kw = dict(seed=0, local_epochs=1, deq_steps=1, bit_chain=(2, 4, 32))
    ref = prowd.run_inprocess("prowd", fed, 2, **kw)
    fl = prowd.run_flower("prowd", fed, 2, **kw)
    assert fl["history"] == ref["history"]
