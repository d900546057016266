"""OCM recipe: rotation pseudo-classes, reservoir buffer, InfoNCE losses, MI preservation, quick run."""
import itertools
import math

import pytest
import torch

from recipe_runs import quick_run
from methods.buffers import ReplayBuffer, reservoir_slot
from methods.ocm import (
    OCMNet,
    forgetting,
    local_rotations,
    ocm_losses,
    ocm_new_loss,
    positive_entropy,
    preservation_loss,
    random_resized_crop,
    rotation_views,
    sup_nt_xent,
)


# ---------------------------------------------------------------------------------------------- views
def test_rotation_views_and_pseudo_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([2, 0, 2])
    views, labels = rotation_views(x, y, num_classes=5)
    n = len(x)
    assert views.shape == (16 * n, 1, 6, 6) and labels.shape == (16 * n,)
    local = local_rotations(x).view(4, n, 1, 6, 6)
    for v in range(16):
        g, l = divmod(v, 4)
        block = views[v * n:(v + 1) * n]
        torch.testing.assert_close(block, torch.rot90(local[l], g, (2, 3)), rtol=0, atol=0)
        assert torch.equal(labels[v * n:(v + 1) * n], y + 5 * v)  # pseudo-class = y + C·v
    # labels decode back to (class, view) and equal labels <=> same class and same transform
    assert torch.equal(labels % 5, y.repeat(16)) and torch.equal(labels // 5, torch.arange(16).repeat_interleave(n))
    same = labels[:, None] == labels[None, :]
    same_ref = (y.repeat(16)[:, None] == y.repeat(16)[None, :]) & \
        (torch.arange(16).repeat_interleave(n)[:, None] == torch.arange(16).repeat_interleave(n)[None, :])
    assert torch.equal(same, same_ref)
    # the 16 views of a generic image are pairwise distinct (so 16 genuinely different pseudo-classes)
    flat = views[::n].flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16)).min() > 1e-6
    # view 0 is the image itself; local variants: halves turned by 180° in place, "both" = left∘right
    torch.testing.assert_close(views[:n], x, rtol=0, atol=0)
    torch.testing.assert_close(local[1][..., :3], torch.rot90(x[..., :3], 2, (2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(local[1][..., 3:], x[..., 3:], rtol=0, atol=0)
    torch.testing.assert_close(local_rotations(local[1]).view(4, n, 1, 6, 6)[3], local[2], rtol=0, atol=0)
    torch.testing.assert_close(local_rotations(local[1]).view(4, n, 1, 6, 6)[1], x, rtol=0, atol=0)  # involution
    with pytest.raises(ValueError, match="even side"):
        rotation_views(torch.rand(2, 1, 5, 5), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        rotation_views(x[:2], y, 5)


def test_random_resized_crop_full_scale_is_identity():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=gen)
    torch.testing.assert_close(random_resized_crop(x, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x)
    out = random_resized_crop(x, gen)
    assert out.shape == x.shape and not torch.allclose(out, x)


# ---------------------------------------------------------------------------------------------- buffer
def test_reservoir_inclusion_is_exactly_uniform_by_enumeration():
    """Enumerate every equally likely draw sequence for a stream of 5 into capacity 2: each item is kept with
    probability exactly 2/5."""
    n, cap = 5, 2
    counts = [0] * n
    total = 0
    for draws in itertools.product(*[range(k + 1) for k in range(cap, n)]):
        slots = [None] * cap
        for i in range(n):
            s = reservoir_slot(i, cap, draws[i - cap] if i >= cap else 0)
            if s >= 0:
                slots[s] = i
        assert None not in slots
        for i in slots:
            counts[i] += 1
        total += 1
    assert total == 3 * 4 * 5
    assert all(c * n == cap * total for c in counts)


def test_reservoir_buffer_size_bound_and_uniformity():
    gen = torch.Generator().manual_seed(0)
    n, cap, trials = 12, 4, 1500
    hits = torch.zeros(n)
    for _ in range(trials):
        buf = ReplayBuffer(cap, gen, policy="reservoir")
        for i in range(0, n, 3):
            buf.add(torch.arange(i, i + 3, dtype=torch.float32)[:, None], torch.arange(i, i + 3))
            assert len(buf) == min(cap, i + 3) and len(buf) <= cap
        xs, kept = buf.stored()
        assert len(set(kept.tolist())) == cap and torch.equal(xs[:, 0].long(), kept)  # pairs stay together
        hits[kept] += 1
    p = hits / trials
    sigma = math.sqrt(cap / n * (1 - cap / n) / trials)
    assert (p - cap / n).abs().max() < 5 * sigma
    xs, ys = buf.sample(10, replace=False)
    assert len(ys) == cap and len(set(ys.tolist())) == cap  # never more than stored, without replacement
    with pytest.raises(ValueError, match="row shapes"):
        buf.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(3, policy="lru")


# ---------------------------------------------------------------------------------------------- losses
def _hand_sup(sim, labels, tau, mask_diag):
    n = len(labels)
    total = 0.0
    for i in range(n):
        ks = [k for k in range(n) if not (mask_diag and k == i)]
        log_den = math.log(sum(math.exp(sim[i][k] / tau) for k in ks))
        pos = [j for j in ks if labels[j] == labels[i]]
        if pos:
            total += sum(-(sim[i][j] / tau - log_den) for j in pos) / len(pos)
    return total / n


def test_sup_nt_xent_matches_hand_computation():
    gen = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    sim = (z @ z.T).tolist()
    for mask in (True, False):
        got = sup_nt_xent(z @ z.T, labels, 0.5, mask_diagonal=mask)
        assert float(got) == pytest.approx(_hand_sup(sim, labels.tolist(), 0.5, mask), rel=1e-12)


def test_ocm_new_loss_matches_hand_computation():
    gen = torch.Generator().manual_seed(2)
    z = torch.nn.functional.normalize(torch.randn(8, 3, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([3, 5, 3, 7])  # 4 views; rows 4..7 are their augmented copies
    tau, n = 0.3, 4
    sim = (z @ z.T).tolist()

    def ell(i, j):
        return -(sim[i][j] / tau - math.log(sum(math.exp(sim[i][k] / tau) for k in range(2 * n) if k != i)))

    sup = _hand_sup(sim, labels.repeat(2).tolist(), tau, True)
    pair = sum(ell(i, i + n) + ell(i + n, i) for i in range(n)) / (2 * n)
    assert float(ocm_new_loss(z, labels, tau)) == pytest.approx(2 * sup + pair, rel=1e-12)
    with pytest.raises(ValueError, match=r"\(2N, d\)"):
        ocm_new_loss(z[:7], labels)


def test_preservation_loss_identities():
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 2, 1, 0])
    zc = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=1)
    zp = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=1)
    tau = 0.2
    # hand computation: rows of the current model against columns of the previous model, P_ii kept
    cross = (zc @ zp.T).tolist()
    hand = 0.0
    for i in range(6):
        log_den = math.log(sum(math.exp(cross[i][k] / tau) for k in range(6)))
        pos = [j for j in range(6) if labels[j] == labels[i]]
        hand += sum(-(cross[i][j] / tau - log_den) for j in pos) / len(pos)
    assert float(preservation_loss(zc, zp, labels, tau)) == pytest.approx(hand / 6, rel=1e-12)
    # equal models: the cross-model bound is the (unmasked) buffer InfoNCE of that model — NOT zero
    same = preservation_loss(zc, zc, labels, tau)
    torch.testing.assert_close(same, sup_nt_xent(zc @ zc.T, labels, tau, mask_diagonal=False))
    assert float(same) > float(positive_entropy(labels))
    # lower bound mean_i H(P_i), reached when every class collapses to its own orthogonal direction (τ → 0)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    assert float(preservation_loss(onehot, onehot, labels, 0.01)) == pytest.approx(float(positive_entropy(labels)),
                                                                                   abs=1e-12)
    assert float(preservation_loss(zc, zp, labels, tau)) >= float(positive_entropy(labels))
    # gradients flow only into the current model
    zc_ = zc.clone().requires_grad_(True)
    zp_ = zp.clone().requires_grad_(True)
    preservation_loss(zc_, zp_, labels, tau).backward()
    assert zp_.grad is None and zc_.grad.abs().sum() > 0


def test_ocm_loss_terms_per_phase():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = OCMNet(64, 10, hidden=32, proj=16)
    x, y = torch.rand(3, 1, 8, 8, generator=gen), torch.tensor([0, 1, 1])
    mem = (torch.rand(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 0, 1]))
    assert set(ocm_losses(model, None, x, y, None, 10, gen)) == {"new", "ce"}
    assert set(ocm_losses(model, model, x, y, mem, 10, gen)) == {"new", "buf", "pre", "ce"}
    assert set(ocm_losses(model, model, x, y, mem, 10, gen, use_preservation=False)) == {"new", "buf", "ce"}
    # from task 2 the classifier is trained on buffer samples only: the CE gradient ignores the new batch labels
    terms_a = ocm_losses(model, None, x, y, mem, 10, torch.Generator().manual_seed(5))
    terms_b = ocm_losses(model, None, x, (y + 1) % 10, mem, 10, torch.Generator().manual_seed(5))
    assert float(terms_a["ce"].detach()) == float(terms_b["ce"].detach())



def test_ocm_buffer_and_preservation_terms_match_the_official_losses():
    """From task 2: ``buf`` = SupCon over [Rot(x_M); A(Rot(x_M))] *without* diagonal masking, ``pre`` = SupCon between
    the current and the previous model's projections of the plain rotated buffer views Rot(x_M); rebuilt here by
    replaying the augmentation draws (first A on the new views, then on the buffer views)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model, prev = OCMNet(64, 10, hidden=32, proj=16), OCMNet(64, 10, hidden=32, proj=16)
    x, y = torch.rand(2, 1, 8, 8, generator=gen), torch.tensor([0, 1])
    xm, ym = torch.rand(3, 1, 8, 8, generator=gen), torch.tensor([2, 3, 2])
    terms = ocm_losses(model, prev, x, y, (xm, ym), 10, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    random_resized_crop(rotation_views(x, y, 10)[0], replay)
    views_m, labels_m = rotation_views(xm, ym, 10)
    with torch.no_grad():
        z_m = model.project(torch.cat([views_m, random_resized_crop(views_m, replay)]))
        buf = sup_nt_xent(z_m @ z_m.T, labels_m.repeat(2), 0.07, mask_diagonal=False)
        pre = preservation_loss(model.project(views_m), prev.project(views_m), labels_m, 0.07)
    assert float(terms["buf"].detach()) == pytest.approx(float(buf), rel=1e-5)
    assert float(terms["pre"].detach()) == pytest.approx(float(pre), rel=1e-5)

def test_forgetting_definition():
    acc = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.6, 0.4, 0.7]]
    assert forgetting(acc) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.4)) / 2)
    # backward transfer: a task that ends above its best earlier accuracy has negative forgetting
    assert forgetting([[0.5, 0.1], [0.8, 0.9]]) == pytest.approx(0.5 - 0.8)


def test_quick_run(tmp_path):
    m, cfg = quick_run("ocm", tmp_path)
    assert set(m["summary"]) == {"finetune", "er", "ocm", "ocm_no_pre"}
    for s in m["summary"].values():
        assert 0 <= s["final_accuracy"]["mean"] <= 1 and -1 <= s["forgetting"]["mean"] <= 1
        assert 0 <= s["last_task_accuracy"]["mean"] <= 1 and s["final_accuracy"]["n"] == 1
        # the representation learns in 4 steps per task: nearest-class-mean read-out far above chance (0.1)
        assert s["final_accuracy_ncm"]["mean"] > 0.5
    for runs in m["runs"].values():
        assert len(runs[0]["acc_matrix"]) == 5
    d = m["paired"]["ocm_minus_er"]["final_accuracy"]
    assert d["mean"] == pytest.approx(m["runs"]["ocm"][0]["final_accuracy"] - m["runs"]["er"][0]["final_accuracy"])
