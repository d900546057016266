"""The prepared GPU check without a GPU: a dry run counts the Triton kernels the device run would compile (the
device call must fit: at most MAX_COMPILES), and a smoke run on tiny shapes (Triton through the interpreter set
by conftest) writes its JSONL row by row, so a GPU task spends its device time on measurements, not on fixing
the script."""
import json
import os
import re
import subprocess
import sys

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_compiles_at_most_the_limit():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # count real compiles, not interpret
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    m = re.search(r"dry run: (\d+) distinct Triton kernels", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr[-2000:]
    assert 10 <= int(m.group(1)) <= gpu_check.MAX_COMPILES, m.group(0)
    assert res.returncode == 0
    # --autotune's alternative tiles (behind the flag, beyond the limit) run through the same plans
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--autotune", "--only", "paths"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count('"case": "autotune"') == 4


def test_smoke_run_writes_every_row_as_measured(tmp_path, monkeypatch):
    seen_on_disk = []

    def probe(ctx):
        # runs after every built-in provider: their rows must already be in the JSONL
        def case():
            seen_on_disk.append(sum(1 for _ in open(ctx.jsonl)))
            return {"rows_before": seen_on_disk[-1]}
        yield "probe", case

    monkeypatch.setattr(gpu_check, "PROVIDERS", [*gpu_check.PROVIDERS, ("probe", probe, False)])
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--skip", "mlp"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert seen_on_disk == [len(lines) - 1]  # everything before the probe row was on disk already
    cases = {r["case"] for r in lines}
    assert {"env", "chain", "correctness", "timing", "paths", "copy bandwidth", "dense GEMM rate"} <= cases
    chain = [r for r in lines if r["case"] == "chain"]
    assert len(chain) == 1 and chain[0]["ok"] and chain[0]["chunks"] == 3 and chain[0]["launches"] == 1, chain
    checks = [r for r in lines if r["case"] == "correctness"]
    assert checks and all(r["ok"] for r in checks), checks
    timing = [r for r in lines if r["case"] == "timing"]
    assert {r["impl"] for r in timing} >= {"dense", "torch", "triton"}
    assert all("predicted_us" in r for r in timing if r["impl"] == "triton")
    paths = [r for r in lines if r["case"] == "paths"]
    assert any({"two_kernel_grouped_store_us", "two_kernel_grouped_store_device_us",
                "two_kernel_grouped_store_predicted_us", "two_kernel_token_major_store_us",
                "two_kernel_token_major_store_predicted_us", "model_store"} <= set(r) for r in paths)
    assert any({"bwd_fused_dxw_us", "bwd_separate_dxw_us", "bwd_bmm_dxw_us", "model_picks", "bwd_g_row_major_us",
                "bwd_g_token_major_us", "bwd_g_bmm_us", "model_picks_g"} <= set(r) for r in paths)
    assert not [r for r in lines if "error" in r]


def test_chain_probe_failure_switches_the_rest_of_the_run_to_separate_launches(monkeypatch):
    """On a GPU the chained forward first runs in a child process with a time limit; a child that hangs (or
    fails) leaves a failed row and ``plan.ONE_LAUNCH`` off, so the remaining cases still run."""
    import torch

    from monarch_kernels.triton import plan

    monkeypatch.setattr(plan, "ONE_LAUNCH", True)
    calls = []

    def hang(cmd, **kw):
        calls.append(cmd)
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setattr(gpu_check.subprocess, "run", hang)
    ctx = gpu_check.Context(torch.device("cuda"))
    (name, case), = list(gpu_check.chain_cases(ctx))
    row = case()
    assert name == "chain" and row["ok"] is False and "no result within" in row["failure"]
    assert plan.ONE_LAUNCH is False and calls and "--chain-probe" in calls[0]
    monkeypatch.setattr(plan, "ONE_LAUNCH", True)
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, '{"ok": true, "chunks": 4}\n', ""))
    assert case() == {"ok": True, "chunks": 4} and plan.ONE_LAUNCH is True
