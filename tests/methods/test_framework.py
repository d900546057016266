"""The shared recipe framework: config as data (quick overrides, user flags win, config.json = what ran), the one
training loop, seed summaries, plots, timers, datasets."""
import ast
import dataclasses
import inspect
import json
import pathlib
import sys
import types
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

import methods
from methods import data, recipe, report, train
from methods.models import MLP, linear
from monarch_kernels.layers import MonarchLinear


@dataclass(frozen=True)
class FakeConfig:
    steps: int = recipe.option(3, "steps")
    lr: float = recipe.option(0.5, "learning rate")
    layer: str = recipe.option("monarch", "layer", choices=("dense", "monarch"))
    ks: tuple[int, ...] = recipe.option((2, 4), "sizes")
    names: tuple[str, ...] = recipe.option(("a", "b"), "names", choices=("a", "b", "c"))
    control: bool = recipe.option(True, "run the control")
    cap: Optional[int] = recipe.option(None, "optional cap")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")


def _fake_module(write_plot=True, lie=False):
    mod = types.ModuleType("methods_fake_recipe")
    seen = {}

    def run(cfg, ctx):
        seen["cfg"] = cfg
        x = torch.randn(4, generator=ctx.generator)
        losses = [float(v) for v in torch.rand(cfg.steps + (1 if lie else 0), generator=ctx.generator)]
        ctx.observe(steps=len(losses))
        if write_plot:
            report.plot_curves(ctx.plot_path("curve.png"), [report.Panel("loss", {"l": (range(len(losses)), losses)})])
        return {"first": float(x[0]), "losses": losses}

    mod.RECIPE = recipe.Recipe("fake", FakeConfig, run, quick={"steps": 1, "ks": (1,)}, description="a fake")
    mod.seen = seen
    return mod


@pytest.fixture
def fake(monkeypatch):
    mod = _fake_module()
    monkeypatch.setitem(sys.modules, "methods_fake_recipe", mod)
    monkeypatch.setitem(methods.RECIPES, "fake", ("methods_fake_recipe", "a fake recipe"))
    return mod


def test_quick_overrides_then_user_flags_win_and_config_json_is_what_ran(fake, tmp_path):
    m = recipe.run_recipe("fake", ["--quick", "--seed", "3", "--lr", "0.25", "--ks", "5,6", "7", "--no-control",
                                   "--names", "c", "--out", str(tmp_path)])
    cfg = json.loads((tmp_path / "config.json").read_text())
    ran = fake.seen["cfg"]
    assert ran == FakeConfig(steps=1, lr=0.25, ks=(5, 6, 7), control=False, names=("c",))  # quick, then flags
    assert cfg["config"] == json.loads(json.dumps(dataclasses.asdict(ran)))
    assert cfg["quick"] is True and cfg["seed"] == 3 and cfg["quick_overrides"] == {"steps": 1, "ks": [1]}
    assert cfg["user_flags"] == ["control", "ks", "lr", "names"]
    assert len(m["losses"]) == 1 and m["observed"] == {"steps": 1}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["losses"] == m["losses"] and saved["wall_time_s"] >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        ran.steps = 5  # the run cannot change its recorded settings
    # a user flag beats the quick override of the same field; same seed, same numbers
    again = recipe.run_recipe("fake", ["--quick", "--steps", "4", "--seed", "3", "--out", str(tmp_path / "b")])
    assert len(again["losses"]) == 4 and again["first"] == m["first"]
    plain = recipe.run_recipe("fake", ["--out", str(tmp_path / "c")])
    assert fake.seen["cfg"] == FakeConfig() and len(plain["losses"]) == 3


def test_bad_flags_and_values_are_rejected(fake, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.run_recipe("fake", ["--layer", "butterfly", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.run_recipe("fake", ["--names", "a,z", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.run_recipe("fake", ["--epochs", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--ks lists a value twice"):
        recipe.run_recipe("fake", ["--ks", "2", "4,2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--steps must be >= 0"):
        recipe.run_recipe("fake", ["--steps", "-1", "--out", str(tmp_path)])
    with pytest.raises(TypeError, match="QUICK names fields the config lacks"):
        recipe.Recipe("x", FakeConfig, lambda c, x: {}, quick={"epochs": 1})
    with pytest.raises(TypeError, match="frozen dataclass"):
        recipe.Recipe("x", dict, lambda c, x: {})


def test_observed_settings_that_disagree_with_the_config_fail_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "methods_fake_recipe", _fake_module(lie=True))
    monkeypatch.setitem(methods.RECIPES, "fake", ("methods_fake_recipe", "a fake recipe"))
    with pytest.raises(RuntimeError, match=r"'steps': \(3, 4\)"):
        recipe.run_recipe("fake", ["--out", str(tmp_path)])
    ctx = recipe.RunContext(str(tmp_path), 0, torch.device("cpu"))
    ctx.observe(epochs=2)
    with pytest.raises(RuntimeError, match="two values"):
        ctx.observe(epochs=3)


def test_run_recipe_requires_a_plot(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "methods_fake_recipe", _fake_module(write_plot=False))
    monkeypatch.setitem(methods.RECIPES, "fake", ("methods_fake_recipe", "a fake recipe"))
    with pytest.raises(RuntimeError, match="wrote no PNG"):
        recipe.run_recipe("fake", ["--out", str(tmp_path)])


def test_cli_list_help_and_unknown(fake, capsys):
    assert recipe.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fake" in out and "gnp" in out
    with pytest.raises(SystemExit):
        recipe.main(["fake", "--help"])
    out = capsys.readouterr().out
    assert "--no-control" in out and "(default 2,4; quick 1)" in out
    with pytest.raises(SystemExit, match="unknown recipe"):
        recipe.main(["nope"])


# ------------------------------------------------------------------------------------------- the training loop
def test_fit_schedule_uses_the_global_step_and_resumes():
    lr = train.cosine_lr(1.0, total_steps=10, warmup=2, min_ratio=0.1)
    assert lr(0) == 0.5 and lr(1) == 1.0 and lr(2) == 1.0 and abs(lr(10) - 0.1) < 1e-12
    assert abs(lr(6) - (0.1 + 0.9 * 0.5)) < 1e-12  # half-way through the decay
    seen = []
    m = nn.Linear(2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=123.0)

    def loss_fn(model, xb, yb):
        seen.append(opt.param_groups[0]["lr"])
        return (model(xb).squeeze(-1) - yb).pow(2).mean()

    gen = torch.Generator().manual_seed(0)
    hist = train.fit(m, opt, train.step_batches(lambda: (torch.randn(4, 2, generator=gen), torch.zeros(4))),
                     epochs=5, start_epoch=2, loss_fn=loss_fn, schedule=lambda s: 0.01 * s)
    assert hist.steps == [2, 3, 4] and seen == [0.02, 0.03, 0.04] and len(hist.step_times) == 3
    assert all(t > 0 for t in hist.step_times) and len(set(hist.losses)) == 3
    with pytest.raises(ValueError, match="start_epoch"):
        train.fit(m, opt, train.step_batches(lambda: None), epochs=1, start_epoch=2, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        train.fit(m, opt, train.step_batches(lambda: None), epochs=1)


def test_fit_epochs_hooks_and_equivalence_with_a_hand_written_loop():
    """fit over epoch_batches with the default update equals the plain loop bit for bit; evaluation runs every
    eval_every epochs and after the last; on_epoch_end once per epoch; a torch scheduler steps per step."""
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    ref, ref_opt = make()
    gen = torch.Generator().manual_seed(5)
    ref_losses = []
    for _ in range(3):
        for idx in train.minibatches(50, 16, gen):
            loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()
            ref_losses.append(loss.item())
    m, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=1.0)
    ends, modes = [], []
    hist = train.fit(m, opt, train.epoch_batches(x, y, batch_size=16, generator=torch.Generator().manual_seed(5)),
                     epochs=3, loss_fn=train.cross_entropy_loss, schedule=sched,
                     evaluate=lambda mod: modes.append(mod.training) or {"n": len(modes)}, eval_every=2,
                     on_epoch_end=ends.append)
    assert hist.losses == ref_losses and len(hist.losses) == 12  # 4 batches (16, 16, 16, 2) x 3 epochs
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))
    assert [e for e, _ in hist.evals] == [2, 3] and ends == [0, 1, 2] and m.training
    assert sched.last_epoch == 12


def test_fit_custom_step_prepare_and_reduce():
    m = nn.Linear(3, 1)
    calls = []

    def step(model, batch):
        (xb,) = batch
        calls.append(xb.shape[0])
        return torch.tensor(float(xb.sum()))

    hist = train.fit(m, None, lambda e: [(torch.ones(2, 3),), (torch.ones(5, 3),)], epochs=2, step=step,
                     prepare=lambda b: (b[0][:1],), reduce=lambda loss: 10 * float(loss))
    assert calls == [1, 1, 1, 1] and hist.losses == [30.0] * 4 and hist.steps == [0, 1, 2, 3]


def test_soft_cross_entropy_is_kl_plus_the_target_entropy():
    t, s = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    p = (t / 2).softmax(-1)
    kl = (p * (p.log() - (s / 2).log_softmax(-1))).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(train.soft_cross_entropy(t, s, 2.0), kl + entropy)
    with pytest.raises(ValueError, match="same shape"):
        train.soft_cross_entropy(t, s[:, :3])


# ------------------------------------------------------------------------------------------- summaries, plots
def test_mean_std_is_the_sample_std_with_n_and_single_runs_have_none():
    s = report.mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["n"] == 3
    assert s["std"] == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())  # ddof = 1, not the population std
    assert s["std"] != pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std(unbiased=False).item())
    one = report.mean_std([0.5])
    assert one["std"] is None and report.format_mean_std(one) == "0.500 (single run)"
    assert report.format_mean_std(s, digits=1) == "2.3 ± 1.5 (n=3)"
    with pytest.raises(ValueError):
        report.mean_std([])


def test_paired_and_aggregate():
    p = report.paired([0.9, 0.8, 0.7], [0.8, 0.85, 0.6])
    assert p["values"] == pytest.approx([0.1, -0.05, 0.1]) and p["positive"] == 2 and p["negative"] == 1
    assert p["mean"] == pytest.approx(0.05) and p["n"] == 3
    with pytest.raises(ValueError, match="equally long"):
        report.paired([1.0], [1.0, 2.0])
    agg = report.aggregate([{"a": 1.0, "b": {"c": 2}, "s": "x", "flag": True, "curve": [1, 2]},
                            {"a": 3.0, "b": {"c": 4}, "s": "y", "flag": False, "curve": [3, 4]}])
    assert set(agg) == {"a", "b"} and agg["a"]["mean"] == 2.0 and agg["b"]["c"]["std"] == pytest.approx(2 ** 0.5)


def test_plot_curves_writes_every_panel_kind(tmp_path):
    path = report.plot_curves(str(tmp_path / "p.png"), [
        report.Panel("lines", {"a": ([1, 2, 3], [0.5, 0.4, 0.3], [0.1, 0.1, 0.1]), "b": ([1, 2], [1.0, 0.9])},
                     logy=True, vline=2, hline={"ref": 0.6}),
        report.Panel("bars", kind="bar", groups={"clean": {"x": [0.9, 0.8], "y": report.mean_std([0.7])},
                                                 "noisy": {"x": [0.5, 0.6]}}),
        report.Panel("scatter", {"ctx": ([0.1, 0.2], [0.3, 0.4], ["e0", "e1"])}, kind="scatter"),
        report.Panel("hist", {"ap": [0.1, 0.5, 0.5, 0.9]}, kind="hist")])
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")
    with pytest.raises(ValueError, match="kind"):
        report.plot_curves(str(tmp_path / "q.png"), [report.Panel("x", kind="pie")])
    xs, mean, std = report.curve_band([[1.0, 2.0], [3.0, 4.0]])
    assert xs == [1, 2] and mean == [2.0, 3.0] and std == pytest.approx([2 ** 0.5] * 2)


def test_latency_timers_measure_and_are_shared_with_bench():
    import time

    from bench import timing

    assert timing.median_time_us is report.median_time_us  # one implementation
    us = report.median_time_us(lambda: time.sleep(0.002), torch.device("cpu"), budget_s=0.02, min_reps=3)
    assert 1500 < us < 50_000
    order = []
    ms = report.interleaved_times_ms({"a": lambda: order.append("a"), "b": lambda: time.sleep(0.003)},
                                     torch.device("cpu"), rounds=3)
    assert order == ["a"] * 4 and len(ms["a"]) == len(ms["b"]) == 3  # one warm-up round + 3 timed
    assert min(ms["b"]) > max(ms["a"]) and min(ms["b"]) >= 3.0


# ------------------------------------------------------------------------------------------- data and models
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


def test_fit_learns_digits_with_a_monarch_mlp():
    split = data.load_digits(seed=0).flat()
    model = MLP(64, 64, 10, depth=2, layer="monarch")
    assert any(isinstance(m, MonarchLinear) for m in model.modules())
    hist = train.fit(model, torch.optim.Adam(model.parameters(), lr=3e-3),
                     train.epoch_batches(split.x_train, split.y_train, batch_size=64,
                                         generator=torch.Generator().manual_seed(0)),
                     epochs=3, loss_fn=train.cross_entropy_loss)
    assert hist.losses[-1] < hist.losses[0]
    metrics = train.evaluate_classifier(model, split.x_test, split.y_test)
    assert metrics["accuracy"] > 0.7 and 0 <= metrics["ece"] <= 1


def test_ece_and_linear_factory():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert train.expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.4)
    # bins are (lo, hi]: a fully confident prediction (confidence exactly 1) lands in the last bin
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.6, 0.4]])
    ece = train.expected_calibration_error(sure, torch.tensor([0, 0, 0, 1]), bins=5)  # bins (0.4, 0.6], (0.8, 1]
    assert ece == pytest.approx(0.5 * abs(0.5 - 1.0) + 0.5 * abs(0.5 - 0.6))
    assert isinstance(linear(2, 8, "monarch", nblocks=4), torch.nn.Linear)  # too small to structure
    with pytest.raises(ValueError, match="layer must be one of"):
        linear(8, 8, "butterfly")


# ------------------------------------------------------------------------------------------- layout
RECIPE_MODULES = [name for name in methods.RECIPES if name != "depthshrinker"]  # depthshrinker: its own branch
ROOT = pathlib.Path(methods.__file__).parent


def _module_files():
    return sorted(p for p in ROOT.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_methods_import_graph_has_no_cycle():
    graph = {}
    for path in _module_files():
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                if mod.startswith("methods"):
                    deps.add(mod)
                    deps.update(f"{mod}.{a.name}" for a in node.names)
        graph[name] = deps
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}
    # a package's __init__ re-exporting its modules is not a cycle of the code: drop edges into a module's own package
    graph = {k: {d for d in v if not k.startswith(d + ".")} for k, v in graph.items()}
    state = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack + [n, d])}"
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    assert "methods.tasks" in graph["methods.distributed"] and "methods.distributed" not in graph["methods.monarch"]


@pytest.mark.parametrize("name", RECIPE_MODULES)
def test_recipes_are_config_plus_a_short_run(name):
    rec = recipe.load_recipe(name)
    assert dataclasses.is_dataclass(rec.config) and rec.config.__dataclass_params__.frozen and rec.quick
    module = sys.modules[rec.run.__module__]
    lines = inspect.getsource(rec.run).count("\n")
    assert lines <= 60, f"{name}: run has {lines} lines"
    path = pathlib.Path(module.__file__)
    if path.parent == ROOT:  # a single-module recipe stays short; larger ones are packages of library modules
        assert len(path.read_text().splitlines()) <= 420, f"{name}: {path.name} is long, make it a package"


def test_no_docstring_cites_files_outside_the_repository():
    for path in _module_files():
        text = path.read_text()
        for bad in ("research/", "SPEC §", "../shared", "methods-a.md", "methods-b.md", "research note"):
            assert bad not in text, f"{path.relative_to(ROOT.parent)} cites {bad!r}"
