"""``python -m bench.host_time`` on CPU: every case runs the Triton backend's host code with the launches turned into
no-ops, and reports what it launched and dispatched (the numbers themselves are the benchmark's, not asserted)."""
from bench import host_time


def test_every_case_launches_its_kernels_and_counts_its_torch_operations():
    rows = host_time.measure(calls=1, rounds=1)
    assert [r["case"] for r in rows] == [label for label, _ in host_time.cases()]
    by_case = {r["case"]: r for r in rows}
    # the fused square forward (auto's path at 1024/32 up to 64 tokens): allocate the output, one launch
    fused = by_case["T=64 1024/32 fused forward"]
    assert (fused["launches"], fused["torch_ops"], fused["kernels"]) == (1, 1, ["_fused_fwd_kernel"])
    for r in rows:
        assert r["host_us"] > 0 and r["torch_ops"] >= 1, r
        square = r["case"].startswith("T=64 1024/32 fused")  # its forward is the fused kernel, not two stages
        assert r is fused or r["launches"] >= 2, r
        assert ("_fused_fwd_kernel" if square else "_bd_fwd_kernel") in r["kernels"], r
    # a few-token forward: allocate the intermediate and the output, launch the two stages (no copies)
    assert by_case["T=16 4096/64 forward"]["launches"] == 2
    assert by_case["T=16 4096/64 forward"]["torch_ops"] == 3
    # every training case runs a backward kernel beside the forward's
    for label, r in by_case.items():
        if label.endswith("forward+backward"):
            assert r["launches"] > by_case[label.replace("forward+backward", "forward")]["launches"] or \
                r["torch_ops"] > by_case[label.replace("forward+backward", "forward")]["torch_ops"], r
