"""The CUDA kernels' synchronisation (``csrc/cuda/``), checked on the CPU emulation of ``tests/sim_harness.py``
under ThreadSanitizer. Every emulated CUDA thread is a std::thread, ``__syncthreads`` and the split cluster
barrier are barriers across them, and a cp.async leaves its destination undefined (NaN-poisoned) until a
``cp.async.wait_group`` retires its group (``tests/cuda_sim/sim.h``). So a missing barrier is a data race that
ThreadSanitizer reports, failing the run, whether or not the values it would corrupt come out right on this
schedule; a read before its wait sees NaN. Each kernel runs on shapes that walk every buffer of its tile loop
(double-buffered x tiles, the cluster's three intermediate buffers wrapping around), outputs checked against
float64 as well. What this cannot see: the device's memory model beyond the barriers (fences between CTAs, the
order in which cp.async copies land among themselves), left to ``bench/gpu_check.sh``."""
import os
import shutil

import pytest
import torch

from sim_harness import ROOT, assert_close, build, expected, expected_z, factors, needs_sim, run_sim

pytestmark = needs_sim

# (kernel, (k, q, p, l, s, r), tokens, SMs, keep the intermediate): the resident kernel with 5 tiles of 16 on 2
# CTAs (one walks 3: the x buffer it read first is refilled; a ragged last tile) and on the 1024/32 layer; the
# cluster form with 11 tiles on one cluster of 2 CTAs (its intermediate buffers wrap around three times) and 3
# tiles on 2 clusters of 4; the row-split decode kernel at 16 tokens with 64 intermediate rows (every warp writes
# some that all warps read)
CASES = [
    ("resident", (4, 32, 16, 8, 16, 16), 75, 2, True),
    ("resident", (32,) * 6, 16, 1, False),
    ("cluster", (16,) * 6, 330, 2, True),
    ("cluster", (32,) * 6, 70, 8, False),
    ("rowsplit", (2, 64, 64, 2, 40, 64), 16, 132, False),
]


def _run(exe, tmp_path, kernel, shape, tokens, sms, keep):
    """Runs one case with bias and GELU and checks it against float64 (``AssertionError`` with the sanitizer's
    report where the run fails)."""
    gen = torch.Generator().manual_seed(sum(shape) + tokens)
    k, q, p, l, s, r = shape
    w1, w2 = factors(*shape, torch.bfloat16, gen)
    x = torch.randn(tokens, k * p, generator=gen).to(torch.bfloat16)
    bias = torch.randn(l * s, generator=gen).to(torch.bfloat16)
    got = run_sim(exe, kernel, tmp_path, x, w1, w2, bias, act="gelu", sms=sms, keep_z=keep)
    assert got[0]["supported"], got[0]
    assert_close(got[1], expected(x, w1, w2, bias, l * s, "gelu"), torch.bfloat16)
    if keep:
        assert_close(got[2], expected_z(x, w1, w2), torch.bfloat16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-T{c[2]}")
def test_no_data_race(sim_tsan_binary, tmp_path, case):
    _run(sim_tsan_binary, tmp_path, *case)


def _mutated(tmp_path, header: str, line: str) -> str:
    """A copy of ``csrc/cuda`` with the one line of ``header`` that reads ``line`` (stripped) emptied."""
    kernels = tmp_path / "kernels"
    shutil.copytree(os.path.join(ROOT, "csrc", "cuda"), kernels)
    src = (kernels / header).read_text().split("\n")
    hits = [i for i, text in enumerate(src) if text.strip() == line]
    assert len(hits) == 1, (header, line, hits)
    src[hits[0]] = ""
    (kernels / header).write_text("\n".join(src))
    return str(kernels)


def test_a_missing_barrier_is_reported(tmp_path):
    """The detector itself: without the barrier between stage 1's reads of the x tile and the intermediate's
    writes over it (``resident.cuh``), the run fails with ThreadSanitizer's data-race report. The values need not
    show it: in the barrier sweep of ``bench/RESULTS.md`` §6d they came out right on this shape under the
    address-sanitizer build, where the OS happened to schedule every read before the overwrite."""
    exe = build(tmp_path, "thread", _mutated(tmp_path, "resident.cuh",
                                             "__syncthreads();  // every warp has read the x tile: the "
                                             "intermediate overwrites it"))
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        _run(exe, tmp_path, *CASES[0])


def test_a_read_before_its_cp_async_wait_sees_nan(tmp_path):
    """The emulated cp.async: without the wait for the x tile's group (``resident.cuh``), stage 1 reads the tile
    before its copies land, NaN in the emulation, so the output is wrong (on the device the copies may or may not
    have landed)."""
    exe = build(tmp_path, "thread", _mutated(tmp_path, "resident.cuh", "cp_async_wait<1>();"))
    with pytest.raises(AssertionError, match="NaN pattern differs"):
        _run(exe, tmp_path, *CASES[0])
