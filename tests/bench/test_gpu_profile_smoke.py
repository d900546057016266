"""The follow-up device script (``bench/gpu_profile.py``) on CPU: every section runs on tiny shapes through the
Triton interpreter and writes its rows, so a device call spends its minutes measuring, not on script bugs (a
first version recursed forever in its own synchronise and lost one call)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_run_writes_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "bench.gpu_profile", "--smoke", "--out", str(tmp_path),
                          "--only", "paths,tiles,kernels,sweep,host"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_profile.jsonl").read_text().splitlines()]
    sections = {r["section"] for r in rows}
    assert sections == {"paths", "tiles", "kernels", "sweep", "host"}
    errors = [r for r in rows if "error" in r]
    # the only refusal: the cuda backend, not built without nvcc and a CUDA torch
    assert all(r.get("case", "").startswith("cuda") for r in errors), errors
    paths = [r for r in rows if r["section"] == "paths"]
    assert any({"two_kernel_grouped_us", "two_kernel_token_major_us", "model_store", "model_fwd_us"} <= set(r)
               for r in paths)
    assert any("bwd_fused_token_major_us" in r for r in paths)
    ragged = [r for r in paths if "T=24 fwd_us" in r]  # the smoke sizes: 32 tokens against 24
    assert len(ragged) == 2 and all({"T=32 fwd_us", "T=32 bwd_us", "T=24 bwd_us"} <= set(r) for r in ragged)
    tiles = {r["kernel"] for r in rows if r["section"] == "tiles"}
    assert tiles == {"stage1 row->token-major P1", "stage2 token-major->token-major P2",
                     "copy token-major -> row-major", "mlp hidden backward"}
    mlp = [r["variant"] for r in rows if r.get("kernel") == "mlp hidden backward"]
    assert len(mlp) == 3 and mlp[0].startswith("plan ") and not any(v.startswith("plan") for v in mlp[1:])
    breakdowns = [r for r in rows if r.get("case", "").endswith(": breakdown")]
    assert {r["case"] for r in breakdowns} == {"triton mk.monarch_linear: breakdown",
                                               "torch mk.monarch_linear: breakdown"}
    for r in breakdowns:  # [function, own µs per call, calls per call], most expensive first
        costs = [entry[1] for entry in r["own_us_per_call"]]
        assert costs and costs == sorted(costs, reverse=True) and all(c >= 0 for c in costs)
    no_launch = {r["case"]: r for r in rows if r.get("case", "").startswith("no launches")}
    assert set(no_launch) == {"no launches (bench.host_time): T=16 4096/64 forward",
                              "no launches (bench.host_time): T=16 4096/64 forward+backward"}
    assert all(r["host_us"] > 0 and r["launches"] >= 2 for r in no_launch.values())
