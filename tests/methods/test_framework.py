"""The shared recipe framework: CLI, run folder contract, datasets, loops."""
import json
import sys
import types

import pytest
import torch

import methods
from methods import data, recipe, train
from methods.models import MLP, linear
from monarch_kernels.layers import MonarchLinear


def _fake_recipe_module(write_plot=True):
    mod = types.ModuleType("methods_fake_recipe")

    def add_arguments(p):
        p.add_argument("--steps", type=int, default=3)

    def run(args, ctx):
        x = torch.randn(4, generator=ctx.generator)
        if write_plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            plt.plot(x.numpy())
            plt.savefig(ctx.plot_path("curve.png"))
            plt.close()
        return {"steps": args.steps, "first": float(x[0]), "quick": args.quick}

    mod.RECIPE = recipe.Recipe("fake", add_arguments, run)
    return mod


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "methods_fake_recipe", _fake_recipe_module())
    monkeypatch.setitem(methods.RECIPES, "fake", ("methods_fake_recipe", "a fake recipe"))


def test_run_recipe_writes_run_folder(fake, tmp_path):
    m = recipe.run_recipe("fake", ["--quick", "--seed", "3", "--steps", "5", "--out", str(tmp_path)])
    assert m["steps"] == 5 and m["quick"] is True and m["wall_time_s"] >= 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["args"]["seed"] == 3 and cfg["recipe"] == "fake"
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 5
    again = recipe.run_recipe("fake", ["--seed", "3", "--out", str(tmp_path / "b")])
    assert again["first"] == m["first"]  # fixed seed, same numbers


def test_run_recipe_requires_a_plot(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "methods_fake_recipe", _fake_recipe_module(write_plot=False))
    monkeypatch.setitem(methods.RECIPES, "fake", ("methods_fake_recipe", "a fake recipe"))
    with pytest.raises(RuntimeError, match="wrote no PNG"):
        recipe.run_recipe("fake", ["--out", str(tmp_path)])


def test_cli_list_and_unknown(fake, capsys):
    assert recipe.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fake" in out and "gnp" in out
    with pytest.raises(SystemExit, match="unknown recipe"):
        recipe.main(["nope"])


def test_datasets_are_deterministic():
    a, b = data.load_digits(seed=1), data.load_digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and a.x_train.shape[1:] == (1, 8, 8)
    assert not torch.equal(a.x_train, data.load_digits(seed=2).x_train)
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    # stratified: every class in both splits
    assert set(a.y_test.tolist()) == set(range(10))
    assert len(set(a.y_test[:40].tolist())) >= 8  # test split interleaved: prefixes are stratified
    tok = data.CharTokenizer("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(ValueError, match="unknown knowledge graph"):
        data.load_kg_triples("freebase")
    with pytest.raises(ImportError, match="pip install"):
        data.require("definitely_not_a_module_xyz", "pip install definitely-not")


def test_train_classifier_learns_digits():
    split = data.load_digits(seed=0).flat()
    model = MLP(64, 64, 10, depth=2, layer="monarch")
    assert any(isinstance(m, MonarchLinear) for m in model.modules())
    losses = train.train_classifier(model, split.x_train, split.y_train, epochs=3, lr=3e-3)
    assert losses[-1] < losses[0]
    metrics = train.evaluate_classifier(model, split.x_test, split.y_test)
    assert metrics["accuracy"] > 0.7 and 0 <= metrics["ece"] <= 1


def test_ece_and_linear_factory():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert train.expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.4)
    assert isinstance(linear(2, 8, "monarch", nblocks=4), torch.nn.Linear)  # too small to structure
    with pytest.raises(ValueError, match="layer must be one of"):
        linear(8, 8, "butterfly")
