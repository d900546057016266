"""IREM: energy-descent step, gradients through the inner steps (double backward through Monarch layers),
truncation, replay buffer, min-energy selection, and the quick end-to-end run."""
import copy
import math

import pytest
import torch

from conftest import rel_err
from monarch_kernels.layers import MonarchLinear
from recipe_runs import quick_run
from methods.buffers import ReplayBuffer
from methods.irem import (EnergyMLP, energy_descent, energy_grad, energy_step, irem_train_step,
                          make_task, min_energy_select)
from monarch_kernels import available_backends, use_backend
from monarch_kernels.backends import get as get_backend_entry


def _cpu_f64_backends():
    names = []
    for name, status in available_backends().items():
        if status == "available" and get_backend_entry(name).supports(torch.device("cpu"), torch.float64):
            names.append(name)
    return names


def _tiny_energy(seed=0):
    torch.manual_seed(seed)
    e = EnergyMLP(3, 4, hidden=8, depth=2, layer="monarch", nblocks=2).double()
    assert any(isinstance(m, MonarchLinear) for m in e.modules())
    return e


def test_energy_step_equals_analytic_gradient_step():
    # E(x, y) = ½‖W y − x‖²  =>  ∇_y E = Wᵀ (W y − x), written out by hand
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    quad = lambda x_, y_: 0.5 * ((y_ @ w.T - x_) ** 2).sum(-1)
    y_next, e = energy_step(quad, x, y, 0.3)
    expected = y - 0.3 * (y @ w.T - x) @ w
    assert rel_err(y_next, expected) < 1e-12
    assert rel_err(e, 0.5 * ((y @ w.T - x) ** 2).sum(-1)) < 1e-12


def test_energy_step_on_monarch_energy_matches_finite_differences():
    e = _tiny_energy()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    y_next, _ = energy_step(e, x, y, 2.0)
    h, fd = 1e-6, torch.zeros_like(y)
    with torch.no_grad():
        for b in range(2):
            for j in range(4):
                yp, ym = y.clone(), y.clone()
                yp[b, j] += h
                ym[b, j] -= h
                fd[b, j] = (e(x, yp)[b] - e(x, ym)[b]) / (2 * h)
    assert rel_err(y_next, y - 2.0 * fd) < 1e-8


def _loss_full(e, x, y0, target, steps, lr):
    y = y0
    for _ in range(steps):
        y, _ = energy_step(e, x, y, lr, create_graph=True)
    return ((y - target) ** 2).mean()


@pytest.mark.parametrize("backend", _cpu_f64_backends())
def test_gradients_through_inner_steps_match_finite_differences(backend):
    """Full unroll (grad_steps = K): dL/dθ through K create_graph steps equals central differences of L(θ)."""
    with use_backend(backend):
        e = _tiny_energy()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        y0 = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2 - 1
        target = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        steps, lr = 3, 0.5
        traj = energy_descent(e, x, y0, steps, lr, grad_steps=steps)
        loss = ((traj.y - target) ** 2).mean()
        grads = torch.autograd.grad(loss, list(e.parameters()), allow_unused=True)
        checked = 0
        for (name, p), g in zip(e.named_parameters(), grads):
            if g is None:  # the energy's output bias shifts E by a constant: ∇_y E does not depend on it
                assert name == "net.net.4.bias", name
                continue
            assert g.abs().sum() > 0, f"no gradient reached {name}"
            for flat in torch.randperm(p.numel(), generator=gen)[:3].tolist():
                with torch.no_grad():
                    old = p.view(-1)[flat].item()
                    p.view(-1)[flat] = old + 1e-6
                    lp = _loss_full(e, x, y0, target, steps, lr).item()
                    p.view(-1)[flat] = old - 1e-6
                    lm = _loss_full(e, x, y0, target, steps, lr).item()
                    p.view(-1)[flat] = old
                fd = (lp - lm) / 2e-6
                assert math.isclose(g.view(-1)[flat].item(), fd, rel_tol=1e-5, abs_tol=1e-9), (name, flat)
                checked += 1
        assert checked >= 3 * (len(grads) - 1)


def test_truncated_gradient_is_that_of_the_last_step_only():
    """grad_steps = 1: θ's gradient equals the finite difference of ‖(y^{K−1} − λ∇E_θ(y^{K−1})) − y*‖² with
    y^{K−1} held fixed, and differs from the full-unroll gradient."""
    e = _tiny_energy(3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    y0 = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2 - 1
    target = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    steps, lr = 4, 0.5
    traj = energy_descent(e, x, y0, steps, lr, grad_steps=1)
    # the forward trajectory does not depend on grad_steps
    full = energy_descent(e, x, y0, steps, lr, grad_steps=steps)
    assert rel_err(traj.ys, full.ys) < 1e-13
    p = e.net.net[2].w1  # a Monarch factor of the hidden layer
    g_trunc, = torch.autograd.grad(((traj.y - target) ** 2).mean(), p)
    g_full, = torch.autograd.grad(((full.y - target) ** 2).mean(), p)
    y_prev = traj.ys[-2].clone()

    def last_step_loss():
        y, _ = energy_step(e, x, y_prev, lr)
        return ((y - target) ** 2).mean().item()

    for flat in range(0, p.numel(), max(1, p.numel() // 5)):
        with torch.no_grad():
            old = p.view(-1)[flat].item()
            p.view(-1)[flat] = old + 1e-6
            lp = last_step_loss()
            p.view(-1)[flat] = old - 1e-6
            lm = last_step_loss()
            p.view(-1)[flat] = old
        assert math.isclose(g_trunc.view(-1)[flat].item(), (lp - lm) / 2e-6, rel_tol=1e-5, abs_tol=1e-10)
    assert rel_err(g_trunc, g_full) > 1e-3


def test_truncation_detaches_the_start():
    e = _tiny_energy()
    x = torch.randn(2, 3, dtype=torch.float64)
    for grad_steps, reaches in ((1, False), (3, True)):
        y0 = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
        traj = energy_descent(e, x, y0, 3, 0.5, grad_steps=grad_steps)
        traj.y.sum().backward()
        assert (y0.grad is not None) == reaches
    traj = energy_descent(e, x, torch.rand(2, 4, dtype=torch.float64), 3, 0.5, grad_steps=0)
    assert not traj.y.requires_grad and traj.energies.shape == (4, 2)
    with pytest.raises(ValueError, match="grad_steps"):
        energy_descent(e, x, torch.rand(2, 4, dtype=torch.float64), 3, 0.5, grad_steps=4)


def test_energy_descent_records_energies_of_each_iterate():
    e = _tiny_energy()
    x, y0 = torch.randn(2, 3, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    traj = energy_descent(e, x, y0, 3, 0.5)
    with torch.no_grad():
        for t in range(4):
            assert rel_err(traj.energies[t], e(x, traj.ys[t])) < 1e-12
    assert torch.equal(traj.ys[0], y0)


def test_replay_buffer_is_a_fifo_ring():
    buf = ReplayBuffer(5, torch.Generator().manual_seed(0))
    rows = lambda a, b: (torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 2),) * 3
    buf.add(*rows(0, 3))
    assert len(buf) == 3
    buf.add(*rows(3, 7))  # wraps: positions 0, 1 now hold rows 5, 6
    assert len(buf) == 5
    assert buf.data[0][:, 0].tolist() == [5, 6, 2, 3, 4]
    x, y, t = buf.sample(200, replace=True)
    assert set(x[:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}  # uniform over what is stored
    assert torch.equal(x, y) and torch.equal(y, t)  # rows stay aligned
    x[:] = -1
    assert buf.data[0].min() >= 0  # samples are copies
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(3).sample(1, replace=True)
    with pytest.raises(ValueError, match="row shapes"):
        buf.add(torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2))


def test_train_step_replays_stored_states():
    torch.manual_seed(0)
    e = EnergyMLP(25, 25, hidden=16, nblocks=4)
    opt = torch.optim.Adam(e.parameters(), 1e-3)
    buf = ReplayBuffer(100, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    x, y = make_task("inverse", 8, 5, generator=gen)
    irem_train_step(e, opt, x, y, steps=2, step_lr=1.0, buffer=buf, generator=gen)
    assert len(buf) == 8  # fresh only (buffer had < B)
    stored = buf.data[1][:8].clone()
    assert stored.abs().max() > 0 and torch.equal(buf.data[2][:8], y)
    irem_train_step(e, opt, x, y, steps=2, step_lr=1.0, buffer=buf, generator=gen)
    assert len(buf) == 24  # B fresh + B replayed pushed back



def test_train_step_is_the_documented_update_from_uniform_starts():
    """One fresh-only step, re-implemented by hand: ``y⁰ ~ U(−1, 1)``, a detached first step, a differentiable last
    step, loss ``mean_b mean_j (y² − y*)²``, one SGD step on θ, and the *reached* states pushed into the buffer."""
    torch.manual_seed(0)
    e = EnergyMLP(25, 25, hidden=16, nblocks=4).double()
    ref = copy.deepcopy(e)
    x, y = make_task("inverse", 6, 5, generator=torch.Generator().manual_seed(1))
    x, y = x.double(), y.double()
    buf = ReplayBuffer(100, torch.Generator().manual_seed(0))
    out = irem_train_step(e, torch.optim.SGD(e.parameters(), lr=0.1), x, y, steps=2, step_lr=0.5, grad_steps=1,
                          buffer=buf, generator=torch.Generator().manual_seed(3))
    y0 = (torch.rand(y.shape, generator=torch.Generator().manual_seed(3)).to(y) * 2 - 1).requires_grad_(True)
    (g0,) = torch.autograd.grad(ref(x, y0).sum(), y0)
    y1 = (y0 - 0.5 * g0).detach().requires_grad_(True)
    (g1,) = torch.autograd.grad(ref(x, y1).sum(), y1, create_graph=True)
    y2 = y1 - 0.5 * g1
    loss = (y2 - y).pow(2).mean()
    assert out["loss"] == pytest.approx(float(loss.detach()), rel=1e-10)
    assert rel_err(buf.data[1][:6], y2.detach()) < 1e-12 and torch.equal(buf.data[2][:6], y)
    loss.backward()
    for p, q in zip(e.parameters(), ref.parameters()):  # (∇_y E does not depend on the output bias: no grad)
        assert rel_err(p.detach(), q.detach() - 0.1 * (0 if q.grad is None else q.grad)) < 1e-12

def test_min_energy_select_picks_the_argmin():
    torch.manual_seed(0)
    ys = torch.randn(6, 5, 3)
    en = torch.randn(6, 5)
    en[0, 2] = float("nan")
    en[:, 3] = torch.tensor([5.0, 4.0, 1.0, 2.0, 3.0, 7.0])
    y, idx = min_energy_select(ys, en)
    assert idx[3] == 2
    for b in range(5):
        valid = [t for t in range(6) if not math.isnan(en[t, b])]
        best = min(valid, key=lambda t: en[t, b].item())
        assert idx[b] == best and torch.equal(y[b], ys[best, b])
    with pytest.raises(ValueError, match="ys"):
        min_energy_select(ys, en[:, :4])


def test_bad_input_is_rejected():
    e = EnergyMLP(3, 4, hidden=8, nblocks=2)
    with pytest.raises(ValueError, match=r"y must have shape \(B, 4\)"):
        e(torch.zeros(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same batch size"):
        energy_grad(e, torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="name must be one of"):
        make_task("sort", 2, 3)


def test_tasks_are_the_official_ones():
    x, y = make_task("inverse", 4, 3, ood=True, generator=torch.Generator().manual_seed(0))
    a, inv = x.view(4, 3, 3).double(), y.view(4, 3, 3).double()
    assert rel_err(a @ inv, torch.eye(3).expand(4, 3, 3).double()) < 1e-4
    assert torch.linalg.eigvalsh(a).min() >= 0.1 - 1e-5  # 2RRᵀ + 0.1 I
    x, y = make_task("addition", 4, 2, ood=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x[:, :4] + x[:, 4:], y) and x.abs().max() <= 2.5


def test_quick_run(tmp_path):
    m, cfg = quick_run("irem", tmp_path)
    assert set(m["per_seed"][0]) == {"addition"} and m["seeds"] == [0]
    for split in ("id", "ood"):
        r = m["per_seed"][0]["addition"][split]
        assert set(r["irem_mse_at_step"]) >= {"5", "10", "20"}
        vals = list(r["irem_mse_at_step"].values()) + [r["feedforward_mse"], r["irem_mse_min_energy"]]
        assert all(math.isfinite(v) and v >= 0 for v in vals)
        assert r["energy_decrease_frac"] > 0.9  # reasoning steps descend the learned energy
        # it learned: after K = 5 steps the answer is far better than the zero predictor
        assert r["irem_mse_at_step"]["5"] < 0.7 * r["zero_predictor_mse"]
        assert m["summary"]["addition"][split]["irem_mse_min_energy"]["mean"] == r["irem_mse_min_energy"]
