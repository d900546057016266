"""``python -m bench.host_time`` on CPU: every case runs the Triton backend's host code with the launches turned into
no-ops, and reports what it launched and dispatched (the numbers themselves are the benchmark's, not asserted)."""
from bench import host_time


def test_every_case_launches_its_kernels_and_counts_its_torch_operations():
    rows = host_time.measure(calls=1, rounds=1)
    assert [r["case"] for r in rows] == [label for label, _ in host_time.cases()]
    for r in rows:
        assert r["host_us"] > 0 and r["torch_ops"] >= 1, r
        assert r["launches"] >= 2 and "_bd_fwd_kernel" in r["kernels"], r
    by_case = {r["case"]: r for r in rows}
    # a few-token forward: allocate the intermediate and the output, launch the two stages (no copies)
    assert by_case["T=16 4096/64 forward"]["launches"] == 2
    assert by_case["T=16 4096/64 forward"]["torch_ops"] == 3
    # every training case runs a backward kernel beside the forward's
    for label, r in by_case.items():
        if label.endswith("forward+backward"):
            assert r["launches"] > by_case[label.replace("forward+backward", "forward")]["launches"] or \
                r["torch_ops"] > by_case[label.replace("forward+backward", "forward")]["torch_ops"], r
