"""Shared by the recipe tests: one ``--quick`` run per recipe, checked against the config contract."""
import dataclasses
import json

from methods import recipe


def quick_run(name: str, tmp_path, *flags: str) -> tuple[dict, dict]:
    """Run ``python -m methods <name> --quick --threads 1 <flags>`` into ``tmp_path``; returns ``(metrics,
    config.json)`` after checking the contract: config.json holds exactly the settings ``run`` received, and every
    setting the quick mode changes was observed on the run's objects with that value (the runner fails the run
    when an observed value differs from the config)."""
    rec = recipe.load_recipe(name)
    received = {}
    original = rec.run

    def spy(cfg, ctx):
        received["cfg"] = cfg
        return original(cfg, ctx)

    object.__setattr__(rec, "run", spy)
    try:
        recipe.run_recipe(name, ["--quick", "--threads", "1", "--out", str(tmp_path), *flags])
    finally:
        object.__setattr__(rec, "run", original)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"] == json.loads(json.dumps(dataclasses.asdict(received["cfg"])))
    assert config["quick"] is True and config["recipe"] == name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(rec.quick) <= set(saved["observed"]), f"not observed: {set(rec.quick) - set(saved['observed'])}"
    for k, v in saved["observed"].items():
        assert config["config"][k] == v, k
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
    return saved, config
