"""DepthShrinker recipe: distillation loss, search, fine-tuning with removed activations, merge, quick run."""
import json

import pytest
import torch
import torch.nn.functional as F

from monarch_kernels.layers.depthshrinker import ShrinkableInvertedResidual, depthshrink, shrink_blocks
from methods.depthshrinker import (
    QUICK_BLOCKS,
    MobileNetV2Mini,
    distillation_loss,
    finetune_removed,
    random_removal,
    search_removal,
)


def test_distillation_loss_identities():
    zs, zt = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert torch.allclose(distillation_loss(zs, zt, y, alpha=0.0), F.cross_entropy(zs, y))
    T = 2.0
    pt = F.softmax(zt / T, -1)
    kl = (pt * (pt.log() - F.log_softmax(zs / T, -1))).sum(-1).mean()
    assert torch.allclose(distillation_loss(zs, zt, y, alpha=1.0, temperature=T), T * T * kl)
    assert distillation_loss(zt, zt, y, alpha=1.0).abs().item() < 1e-6
    mixed = distillation_loss(zs, zt, y, alpha=0.7)
    assert torch.allclose(mixed, 0.7 * distillation_loss(zs, zt, y, 1.0) + 0.3 * F.cross_entropy(zs, y))
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(zs, zt[:, :3], y)


def _tiny_model():
    torch.manual_seed(0)
    return MobileNetV2Mini(1, 3, QUICK_BLOCKS, stem_channels=8, stem_stride=1, head_channels=16)


def _tiny_data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_search_returns_topk_mask_and_moves_scores():
    model = _tiny_model()
    x, y = _tiny_data()
    removed, hist = search_removal(model, x, y, keep_ratio=0.5, epochs=2, batch_size=16, lr=1e-2,
                                   generator=torch.Generator().manual_seed(0))
    assert removed.dtype == torch.bool and removed.numel() == 4 and int(removed.sum()) == 2
    assert len(hist) == 3 and hist[0] == [0.5] * 4 and hist[-1] != hist[0]
    final = torch.tensor(hist[-1])
    assert final[removed].min() >= final[~removed].max()  # removed = the largest scores
    assert all(b.gate.mode == "keep" for b in shrink_blocks(model))  # the input model is untouched


def test_finetune_removed_then_merge_is_exact():
    model = _tiny_model()
    x, y = _tiny_data()
    tensors = lambda m: {k: v for k, v in m.state_dict().items() if torch.is_tensor(v)}  # noqa: E731 (no extra state)
    before = {k: v.clone() for k, v in tensors(model).items()}
    mask = [True, False, True, True]
    ft = finetune_removed(model, mask, x, y, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert [b.gate.mode for b in shrink_blocks(ft)] == ["remove", "keep", "remove", "remove"]
    assert all(torch.equal(before[k], v) for k, v in tensors(model).items())  # teacher untouched
    assert any(not torch.equal(before[k], v) for k, v in tensors(ft).items())  # student trained
    merged = depthshrink(ft)
    assert sum(isinstance(m, ShrinkableInvertedResidual) for m in merged.modules()) == 1
    with torch.no_grad():
        assert (merged(x) - ft(x)).abs().max().item() <= 1e-5


def test_random_removal_count():
    r = random_removal(8, 3, torch.Generator().manual_seed(1))
    assert r.dtype == torch.bool and int(r.sum()) == 3


def test_quick_run(tmp_path):
    from methods.recipe import run_recipe

    m = run_recipe("depthshrinker", ["--quick", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["acc_original"] == m["acc_original"]
    for key in ("acc_original", "acc_merged", "acc_learned_no_ft_mean", "acc_learned_finetuned_mean",
                "acc_random_no_ft_mean", "acc_random_finetuned_mean"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["merge_max_abs_logit_diff"] <= 1e-4
    assert abs(m["acc_merged"] - m["acc_learned_finetuned"][0]) <= 1 / m["n_test"] + 1e-9
    assert m["conv_layers_after"] < m["conv_layers_before"]
    assert m["latency_ms_merged"] > 0 and m["latency_ms_unmerged"] > 0
    assert sum(m["learned_mask_removed"]) == m["n_removed"] == sum(m["random_masks_removed"][0])
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
