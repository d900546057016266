"""methods.monarch: the quick end-to-end run of all three modes, and the identities the recipe relies on."""
import copy
import math

import pytest
import torch

from monarch_kernels.layers import MonarchLinear, densify, monarchify
from methods import monarch as M
from methods import tasks
from methods.models import ViT
from methods.recipe import run_recipe
from recipe_runs import quick_run


def test_quick_all_modes_writes_measured_metrics(tmp_path):
    m, cfg = quick_run("monarch", tmp_path)
    assert m["mode"] == "all" and cfg["config"]["size"] == "tiny"
    assert {p.split("/")[-1] for p in m["plots"]} == {"sparse_training.png", "dense_to_sparse.png",
                                                      "reverse_sparsification.png"}
    # 1. sparse training: both models trained and measured, Monarch smaller and cheaper by construction
    for task in ("gpt", "vit"):
        d, s = m["sparse"][task]["dense"], m["sparse"][task]["monarch"]
        for r in (d, s):
            assert math.isfinite(r["val_loss"]) and r["time_per_step_ms_median"] > 0 and r["interleaved_step_ms"] > 0
            assert len(r["curve"]) >= 2
        assert s["params"] < d["params"] and s["forward_flops_per_sample"] < d["forward_flops_per_sample"]
        assert s["monarch_weight_params"] < s["monarch_weight_params_if_dense"] and d["monarch_weight_params"] == 0
        assert m["sparse"][task]["monarch_vs_dense"]["param_ratio"] == pytest.approx(s["params"] / d["params"])
    for k in ("dense", "monarch"):
        assert m["sparse"]["vit"][k]["val_acc"] > 0.2  # 80 steps on digits: far above chance (0.1)
        assert m["sparse"]["gpt"][k]["val_loss"] < math.log(m["vocab_size"])  # below the uniform-prediction loss
    gpt = m["sparse"]["gpt"]
    assert gpt["monarch"]["monarch_backend_auto"] and not gpt["dense"]["monarch_backend_auto"]
    # 2. dense-to-sparse: projection of a trained model starts far below a random Monarch model
    d2s = m["d2s"]["runs"]
    assert set(d2s) == {"projected_monarch", "random_monarch", "pretrained_attn_random_monarch_mlp",
                        "dense_pretrained"}
    assert d2s["projected_monarch"]["val_loss_at_start"] < d2s["random_monarch"]["val_loss_at_start"] - 0.3
    assert d2s["random_monarch"]["val_loss_at_start"] == pytest.approx(math.log(m["vocab_size"]), abs=0.3)
    err = m["d2s"]["projection_rel_error"]
    assert 0 < err["trained_mean"] < 1 and 0 < err["gaussian_mean"] < 1
    # 3. reverse sparsification: densify is exact, the run ends dense, all three runs have the same step count
    rev = m["reverse"]
    assert rev["densify_max_abs_logit_change"] < 1e-4 and rev["switch_step"] == 24 and rev["total_steps"] == 30
    assert rev["params_at_end"]["reverse_sparsification"] == rev["params_at_end"]["dense_from_start"]
    assert rev["params_at_end"]["monarch_only"] < rev["params_at_end"]["dense_from_start"]
    assert rev["optimizer_state_carried"] > 0
    for r in rev["runs"].values():
        assert math.isfinite(r["val_loss"]) and r["train_time_s"] > 0
    t = rev["interleaved_step_ms"]
    assert rev["runs"]["reverse_sparsification"]["time_from_interleaved_s"] == pytest.approx(
        (24 * t["monarch"] + 6 * t["dense"]) / 1e3)


def _tiny_gpt(mlp="monarch"):
    from methods.models import tiny_gpt2

    return tiny_gpt2(20, n_layer=2, n_embd=16, n_head=2, n_positions=16, mlp=mlp, seed=0).double()


def test_project_after_densify_recovers_a_monarch_model():
    """d2s/reverse identities: densify is exact, and projecting a dense model whose MLP weights are Monarch
    (Frobenius-optimal projection) gives back the same function."""
    model = _tiny_gpt()
    x = torch.randint(0, 20, (3, 16))
    ref = model(x).logits
    dense = copy.deepcopy(model)
    names = densify(dense)
    assert len(names) == 4 and not any(isinstance(m, MonarchLinear) for m in dense.modules())
    assert (dense(x).logits - ref).abs().max() < 1e-10
    again = copy.deepcopy(dense)
    assert monarchify(again, nblocks=4, include=tasks.GPT_MLP, project=True) == names
    assert (again(x).logits - ref).abs().max() < 1e-8
    err = M.projection_errors(dense, again)
    assert err["trained_mean"] < 1e-8 and err["gaussian_mean"] > 0.5  # Gaussian weights are far from Monarch


def test_model_cost_counts_monarch_factors_and_dense_layers():
    vit = ViT(image_size=8, patch=2, dim=16, depth=2, heads=2, mlp_ratio=4)
    dense_cost = M.model_cost(vit, vit.tokens)
    replaced = monarchify(vit, nblocks=4, include=tasks.VIT_MLP)
    assert replaced == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    cost = M.model_cost(vit, vit.tokens)
    layers = [m for m in vit.modules() if isinstance(m, MonarchLinear)]
    saved = sum(2 * (m.in_features * m.out_features - m.w1.numel() - m.w2.numel()) for m in layers)
    assert dense_cost["linear_flops_per_token"] - cost["linear_flops_per_token"] == saved
    assert cost["monarch_weight_params"] == sum(m.w1.numel() + m.w2.numel() for m in layers)
    assert cost["monarch_weight_params_if_dense"] == 4 * 16 * 64
    assert dense_cost["params"] - cost["params"] == saved // 2
    # attention: 2 FLOPs × (QK^T + AV) × T × d per token per layer
    t = vit.tokens
    assert dense_cost["forward_flops_per_sample"] == t * dense_cost["linear_flops_per_token"] + t * 2 * 4 * t * 16
    gpt = _tiny_gpt("dense")
    c = M.model_cost(gpt, 16, causal=True)
    # Conv1D (attention + MLP) + tied lm_head (nn.Linear) weights
    assert c["linear_flops_per_token"] == 2 * (2 * (16 * 48 + 16 * 16 + 2 * 16 * 64) + 16 * 20)
    with pytest.raises(ValueError, match="tokens"):
        M.model_cost(gpt, 0)


def test_vit_shapes_and_bad_input():
    vit = ViT(image_size=8, patch=2, dim=16, depth=1, heads=2)
    assert vit(torch.rand(5, 1, 8, 8)).shape == (5, 10) and vit.tokens == 17
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        vit(torch.rand(5, 64))
    with pytest.raises(ValueError, match="divisible by patch"):
        ViT(image_size=8, patch=3)
    with pytest.raises(ValueError, match="name must be 'gpt' or 'vit'"):
        tasks.make_task("bert")
    with pytest.raises(ValueError, match="dataset must be one of"):
        tasks.ImageTask("tiny", dataset="cifar")


def test_transfer_optimizer_state_after_densify_keeps_unchanged_parameters():
    model = ViT(image_size=8, patch=2, dim=16, depth=1, heads=2)
    monarchify(model, nblocks=4, include=tasks.VIT_MLP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tasks.ImageTask.loss(model, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    dense = copy.deepcopy(model)
    densify(dense)
    new_opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    carried = M.transfer_optimizer_state(model, opt, dense, new_opt)
    new_names = {n for n, _ in dense.named_parameters()}
    assert set(carried) == new_names - {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}
    old = dict(model.named_parameters())
    for n, p in dense.named_parameters():
        if n in carried:
            assert torch.equal(new_opt.state[p]["exp_avg"], opt.state[old[n]]["exp_avg"])
            assert new_opt.state[p]["exp_avg"] is not opt.state[old[n]]["exp_avg"]  # a copy
        else:
            assert p not in new_opt.state


def test_bad_switch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--switch"):
        run_recipe("monarch", ["--quick", "--switch", "1.5", "--out", str(tmp_path)])


def test_model_cost_of_dense_vit_counts_every_projection():
    vit = ViT(image_size=8, patch=2, dim=16, depth=1, heads=2, mlp_ratio=4, num_classes=10)
    # patch embedding 4→16, qkv 16→48, out 16→16, MLP 16→64→16, head 16→10
    assert M.model_cost(vit, vit.tokens)["linear_flops_per_token"] == 2 * (4 * 16 + 16 * 48 + 16 * 16 + 2 * 16 * 64
                                                                           + 16 * 10)
