"""The prepared GPU check runs end to end on tiny shapes (Triton through the interpreter set by conftest), so a
GPU task spends its device time on measurements, not on fixing the script."""
import json

from bench.gpu_check import main


def test_gpu_check_smoke(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Triton forward: fused (D2) vs two-kernel (D0)" in out
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = data["checks"]
    assert checks and all(c["ok"] for c in checks)
    assert {c["impl"] for c in checks} >= {"triton/fused", "triton/two_kernel", "cpu"}
    assert {r["impl"] for r in data["timing"]} >= {"dense", "torch", "triton", "cpu"}
