"""DepthShrinker recipe: distillation loss, both searches' update rules, BN recalibration, fine-tuning with removed
activations, merge, quick run."""
import copy

import pytest
import torch
import torch.nn.functional as F
from recipe_runs import quick_run

from methods.depthshrinker import (
    QUICK_BLOCKS,
    cut_margin,
    distillation_loss,
    finetune_removed,
    random_removal,
    recalibrate_bn,
    search_removal,
)
from monarch_kernels.layers.depthshrinker import (
    MobileNetV2Mini,
    ShrinkableInvertedResidual,
    capped_simplex_projection,
    depthshrink,
    set_relaxed,
    set_removed,
    set_search,
    shrink_blocks,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs and BatchNorms: one thread (as the README command) avoids OpenMP start-up and contention costs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_distillation_loss_identities():
    zs, zt = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert torch.allclose(distillation_loss(zs, zt, y, alpha=0.0), F.cross_entropy(zs, y))
    T = 2.0
    pt = F.softmax(zt / T, -1)
    soft_ce = -(pt * F.log_softmax(zs / T, -1)).sum(-1).mean()  # the official soft cross-entropy
    assert torch.allclose(distillation_loss(zs, zt, y, alpha=1.0, temperature=T), T * T * soft_ce)
    entropy = -(pt * pt.log()).sum(-1).mean()  # at z_s = z_t only the teacher entropy is left
    assert torch.allclose(distillation_loss(zt, zt, y, alpha=1.0, temperature=T), T * T * entropy)
    zs.requires_grad_(True)
    distillation_loss(zs, zt.requires_grad_(True), y, alpha=1.0).backward()
    assert zt.grad is None  # the teacher is a constant
    zs, zt = zs.detach(), zt.detach()
    mixed = distillation_loss(zs, zt, y, alpha=0.7)
    assert torch.allclose(mixed, 0.7 * distillation_loss(zs, zt, y, 1.0) + 0.3 * F.cross_entropy(zs, y))
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(zs, zt[:, :3], y)


def _tiny_model():
    torch.manual_seed(0)
    return MobileNetV2Mini(1, 3, QUICK_BLOCKS, stem_channels=8, stem_stride=1, head_channels=16, pointwise="monarch")


def _tiny_data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("method", ["relax", "hard"])
def test_one_search_step_is_the_documented_score_update(method):
    """One full-batch step: relax → scores = Π_budget(R/N − lr·∂L/∂s); hard → R/N − lr·∂L/∂s with the hard top-k
    gate (ties: the first ⌊keep·N⌋ blocks kept), the gradient taken by autograd on an independent copy."""
    model = _tiny_model()
    x, y = _tiny_data(32)
    ref = copy.deepcopy(model)
    set_relaxed(ref, 0.5)
    if method == "hard":
        assert set_search(ref, 0.5).tolist() == [False, False, True, True]
    F.cross_entropy(ref.train()(x), y).backward()
    grad = torch.stack([b.gate.score.grad for b in shrink_blocks(ref)]).double()
    assert grad.abs().min() > 0 and (grad.max() - grad.min()) > 1e-4  # every block has a distinct signal
    lr = 0.3
    expected = torch.full((4,), 0.5, dtype=torch.float64) - lr * grad
    if method == "relax":
        expected = capped_simplex_projection(expected, 2)
    removed, hist = search_removal(model, x, y, keep_ratio=0.5, epochs=1, method=method, batch_size=32,
                                   score_lr=lr, generator=torch.Generator().manual_seed(0))
    assert hist[0] == [0.5] * 4 and len(hist) == 2
    assert torch.allclose(torch.tensor(hist[1], dtype=torch.float64), expected, atol=1e-6)
    assert removed.tolist() == [bool(v) for v in expected >= expected.sort().values[2]]  # the 2 largest
    assert all(b.gate.mode == "keep" for b in shrink_blocks(model))  # the input model is untouched
    with pytest.raises(ValueError, match="method"):
        search_removal(model, x, y, keep_ratio=0.5, epochs=1, method="gumbel", generator=torch.Generator())


def test_relaxed_search_stays_on_the_budget():
    model = _tiny_model()
    x, y = _tiny_data()
    removed, hist = search_removal(model, x, y, keep_ratio=0.5, epochs=2, batch_size=16, score_lr=0.5,
                                   generator=torch.Generator().manual_seed(0))
    assert removed.dtype == torch.bool and int(removed.sum()) == 2
    for scores in hist:
        assert abs(sum(scores) - 2) < 1e-5 and min(scores) >= 0 and max(scores) <= 1
    assert hist[-1] != hist[0]
    final = torch.tensor(hist[-1])
    assert final[removed].min() >= final[~removed].max()
    assert cut_margin(hist[-1], removed) == pytest.approx(float(final[removed].min() - final[~removed].max()))


def test_cut_margin():
    assert cut_margin([0.9, 0.1, 0.6, 0.4], [True, False, True, False]) == pytest.approx(0.2)
    assert cut_margin([0.5, 0.5], [True, False]) == 0.0
    assert cut_margin([0.5, 0.5], [False, False]) == float("inf")


def test_recalibrate_bn_averages_the_batch_statistics():
    model = _tiny_model()
    x, _ = _tiny_data(40)
    bn = model.stem[1]
    momentum = bn.momentum
    recalibrate_bn(model, x, batch_size=16)  # batches of 16, 16, 8: the plain average of their statistics
    h = model.stem[0](x).detach()
    chunks = [h[i:i + 16] for i in range(0, 40, 16)]
    assert torch.allclose(bn.running_mean, torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([c.var((0, 2, 3)) for c in chunks]).mean(0), atol=1e-5)
    assert not model.training and bn.momentum == momentum and int(bn.num_batches_tracked) == 3


def test_finetune_removed_then_merge_is_exact():
    model = _tiny_model()
    x, y = _tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = [True, False, True, True]
    ft, hist = finetune_removed(model, mask, x, y, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert hist.epochs == 1 and len(hist.losses) == 3
    assert [b.gate.mode for b in shrink_blocks(ft)] == ["remove", "keep", "remove", "remove"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # teacher untouched
    assert any(not torch.equal(before[k], v) for k, v in ft.state_dict().items())  # student trained
    merged = depthshrink(ft)
    assert sum(isinstance(m, ShrinkableInvertedResidual) for m in merged.modules()) == 1
    with torch.no_grad():
        assert (merged(x) - ft(x)).abs().max().item() <= 1e-5



def test_finetune_distils_from_the_teacher_in_eval_mode():
    """The first full-batch fine-tuning loss is the distillation loss of the train-mode student (removed activations)
    against the *eval-mode* original (running BN statistics), computed independently."""
    model = _tiny_model()
    x, y = _tiny_data()
    with torch.no_grad():  # give the original running statistics that differ from a single batch's
        model(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 3)
    mask = [True, False, True, True]
    _, hist = finetune_removed(model, mask, x, y, epochs=1, batch_size=len(x), alpha=0.7,
                               generator=torch.Generator().manual_seed(0))
    student = copy.deepcopy(model).train()
    set_removed(student, mask)
    with torch.no_grad():
        expected = distillation_loss(student(x), copy.deepcopy(model).eval()(x), y, alpha=0.7)
    assert hist.losses[0] == pytest.approx(float(expected), rel=1e-5)

def test_random_removal_count():
    r = random_removal(8, 3, torch.Generator().manual_seed(1))
    assert r.dtype == torch.bool and int(r.sum()) == 3


def test_quick_run(tmp_path):
    m, config = quick_run("depthshrinker", tmp_path)
    assert config["config"]["pointwise"] == "monarch" and config["config"]["search"] == "relax"
    s = m["summary"]
    assert min(s["acc_original"]["values"]) > 0.5  # learns something (10 classes)
    for key, v in s.items():
        assert v["n"] == len(m["seeds"]) and all(0.0 <= a <= 1.0 for a in v["values"]), key
    merge = m["merge"]
    assert merge["merge_max_abs_logit_diff"] <= 1e-4
    assert abs(merge["acc_merged"] - s["acc_learned_finetuned"]["values"][0]) <= 1 / m["n_test"] + 1e-9
    assert merge["layers_merged"]["conv"] < merge["layers_unmerged"]["conv"]
    assert all(v > 0 for v in merge["latency_ms"].values())
    assert merge["params"]["learned_merged"] != merge["params"]["learned_unmerged"]
    for r in m["per_seed"]:
        assert sum(r["mask_learned"]) == sum(r["mask_random"]) == m["n_removed"]
        assert abs(sum(r["scores"]) - m["n_removed"]) < 1e-5
    d = m["paired"]["learned_minus_random_finetuned"]
    assert d["values"] == [a - b for a, b in zip(s["acc_learned_finetuned"]["values"],
                                                 s["acc_random_finetuned"]["values"])]
