"""The row-split few-token Monarch forward (``csrc/cuda/decode_rowsplit.cuh``) run on the CPU.

``tests/cuda_sim/sim.h`` emulates the CUDA execution model (a std::thread per CUDA thread, barriers for
``__syncthreads`` and warp shuffles), so the kernel's own source — its plan, indexing, P1/P2, chunking, shuffle
reductions, rounding and epilogue — is compiled by g++ with address and undefined-behaviour sanitizers and
checked per element against the float64 reference, with poisoned outputs and NaN-poisoned shared memory. What
this cannot check (the device's real loads, occupancy, speed) is left to ``bench/gpu_check.sh`` on a GPU.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from monarch_kernels import cuda_cost, reference
from monarch_kernels.activations import CODES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
H100_SMS, H100_SMEM = 132, 232448

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
    reason="needs g++ and the CUDA toolkit's headers (cuda_bf16.h) to build the CPU emulation",
)


@pytest.fixture(scope="module")
def sim_binary(tmp_path_factory):
    exe = tmp_path_factory.mktemp("rowsplit_sim") / "rowsplit_sim"
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
           "-Wno-attributes", "-DMONARCH_CUDA_SIM", f"-I{CUDA_INCLUDE}", f"-I{ROOT}/csrc/cuda",
           "-include", f"{ROOT}/tests/cuda_sim/sim.h", f"{ROOT}/tests/cuda_sim/rowsplit_main.cpp", "-pthread",
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(exe)


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.view(view).numpy().tobytes()


def run_sim(exe, tmp_path, x, w1, w2, bias=None, n_out=None, act="none", misalign=False, sms=H100_SMS,
            smem=H100_SMEM):
    """(plan dict, output tensor or None) of the kernel on x (any strides) and the factors."""
    tokens, n_in = x.shape
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    n_out = l * s if n_out is None else n_out
    x_ts, x_fs = x.stride()
    span = x_ts * (tokens - 1) + x_fs * (n_in - 1) + 1
    (tmp_path / "x.bin").write_bytes(_raw(torch.as_strided(x, (span,), (1,), x.storage_offset())))
    (tmp_path / "w1.bin").write_bytes(_raw(w1))
    (tmp_path / "w2.bin").write_bytes(_raw(w2))
    if bias is not None:
        (tmp_path / "bias.bin").write_bytes(_raw(bias))
    args = [DTYPES[x.dtype], tokens, k, q, p, l, s, r, n_in, n_out, x_ts, x_fs, CODES[act], int(bias is not None),
            sms, smem, int(misalign)]
    proc = subprocess.run([exe, *map(str, args), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)
    if not plan["supported"]:
        return plan, None
    raw = (tmp_path / "out.bin").read_bytes()
    dt = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[x.dtype]
    out = torch.frombuffer(bytearray(raw), dtype=dt).view(x.dtype).reshape(tokens, n_out)
    return plan, out


def expected(x, w1, w2, bias, n_out, act):
    d = torch.float64
    return reference.monarch_fwd(x.to(d), w1.to(d), w2.to(d), None if bias is None else bias.to(d), n_out, act)


def assert_close(out, exp, dtype):
    """Per element, relative to the output's scale; NaN exactly where the reference has NaN, the same
    infinities where it has infinities."""
    out = out.double()
    nan = exp.isnan()
    assert torch.equal(out.isnan(), nan), "NaN pattern differs (or an output was never written)"
    inf = exp.isinf()
    assert torch.equal(out[inf], exp[inf]), "infinities differ"
    fin = exp.isfinite()
    scale = exp[fin].abs().max().clamp_min(1e-30)
    err = ((out[fin] - exp[fin]).abs() / scale).max().item() if fin.any() else 0.0
    assert err <= TOL[dtype], f"max error {err:.3g} relative to the output scale > {TOL[dtype]}"


def factors(k, q, p, l, s, r, dtype, gen):
    w1 = torch.randn(k, q, p, generator=gen) / p ** 0.5
    w2 = torch.randn(l, s, r, generator=gen) / r ** 0.5
    return w1.to(dtype), w2.to(dtype)


# (k, q, p, l, s, r): square c = 1, rank c = 2, fan-out / fan-in GPT-2-like, 1-wide blocks, r < k, odd widths
SHAPES = [
    (8, 8, 8, 8, 8, 8),
    (4, 8, 16, 4, 24, 8),
    (4, 48, 12, 4, 48, 48),
    (4, 12, 48, 4, 12, 12),
    (16, 1, 1, 4, 3, 4),
    (8, 2, 4, 16, 5, 1),
    (5, 6, 7, 3, 9, 10),
    (2, 64, 64, 2, 40, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64(sim_binary, tmp_path, shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    k, q, p, l, s, r = shape
    w1, w2 = factors(*shape, dtype, gen)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, k * p, generator=gen).to(dtype)
        plan, out = run_sim(sim_binary, tmp_path, x, w1, w2)
        assert plan["supported"], plan
        assert_close(out, expected(x, w1, w2, None, l * s, "none"), dtype)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_bias_activation_ragged_strided(sim_binary, tmp_path, act):
    """n_in < k·p (missing inputs are zero), n_out < l·s (truncated), x with a row pitch and column stride 2,
    bias and an activation; the same call with misaligned operands (element loads instead of vectors)."""
    gen = torch.Generator().manual_seed(7)
    k, q, p, l, s, r = 4, 16, 16, 8, 12, 8
    w1, w2 = factors(k, q, p, l, s, r, torch.bfloat16, gen)
    n_in, n_out = 61, 90
    base = torch.randn(5, 2 * n_in + 6, generator=gen).to(torch.bfloat16)
    x = base[:, : 2 * n_in : 2]
    bias = torch.randn(n_out, generator=gen).to(torch.bfloat16)
    exp = expected(x, w1, w2, bias, n_out, act)
    for misalign in (False, True):
        plan, out = run_sim(sim_binary, tmp_path, x, w1, w2, bias, n_out, act, misalign=misalign)
        assert plan["x_vec"] == 0 and plan["s1_vec"] == 0 and plan["w1_vec"] == int(not misalign)
        assert_close(out, exp, torch.bfloat16)


def test_vector_paths_and_splits(sim_binary, tmp_path):
    """Aligned 16-byte rows take the vector loads (stage 1's branch-free path, several rows per lane group,
    rows past r clamped to a valid one and dropped); few stage-2 blocks are split across CTAs (splits > 1), and
    every split writes its own rows (the poisoned output would show a missing one)."""
    gen = torch.Generator().manual_seed(3)
    k, q, p, l, s, r = 4, 16, 32, 2, 64, 32
    w1, w2 = factors(k, q, p, l, s, r, torch.float16, gen)
    x = torch.randn(4, k * p, generator=gen).to(torch.float16)
    bias = torch.randn(l * s, generator=gen).to(torch.float16)
    plan, out = run_sim(sim_binary, tmp_path, x, w1, w2, bias)
    assert plan["x_vec"] == plan["w1_vec"] == plan["w2_vec"] == plan["s1_vec"] == 1  # the branch-free stage 1
    assert plan["splits"] == 4 and plan["s_per"] == 16
    assert_close(out, expected(x, w1, w2, bias, l * s, "none"), torch.float16)


def test_nan_and_inf_propagate(sim_binary, tmp_path):
    gen = torch.Generator().manual_seed(11)
    shape = (8, 8, 8, 8, 8, 8)
    w1, w2 = factors(*shape, torch.float32, gen)
    x = torch.randn(3, 64, generator=gen)
    x[0, 5] = float("nan")
    x[2, 17] = float("inf")
    _, out = run_sim(sim_binary, tmp_path, x, w1, w2)
    exp = expected(x, w1, w2, None, 64, "none")
    assert exp[0].isnan().all() and exp[1].isfinite().all() and not exp[2].isfinite().all()
    assert_close(out, exp, torch.float32)


def test_plan_declines_and_matches_the_cost_model(sim_binary, tmp_path):
    """The plan declines past 16 tokens, past its per-CTA stage-1 bytes and past the shared memory; the cost
    model's mirror (:func:`monarch_kernels.cuda_cost.rowsplit_plan`) agrees with it on every case."""
    gen = torch.Generator().manual_seed(5)
    cases = [  # (tokens, (k, q, p, l, s, r), smem)
        (17, (8, 8, 8, 8, 8, 8), H100_SMEM),
        (16, (8, 8, 8, 8, 8, 8), 16 * 8 * 4 - 4),
        (16, (8, 8, 8, 8, 8, 8), 16 * 8 * 4),
        (1, (4, 256, 256, 4, 256, 256), H100_SMEM),   # 1/l of w1 = 128 KiB: taken
        (1, (2, 512, 512, 2, 512, 512), H100_SMEM),   # 512 KiB + x: declined
        (16, (64, 64, 64, 64, 64, 64), H100_SMEM),
        (3, (5, 6, 7, 3, 9, 10), H100_SMEM),
    ]
    sms = 8  # few CTAs per case (the emulation runs a thread per CUDA thread)
    for tokens, shape, smem in cases:
        k, q, p, l, s, r = shape
        w1 = torch.zeros(k, q, p, dtype=torch.bfloat16)
        w2 = torch.zeros(l, s, r, dtype=torch.bfloat16)
        x = torch.randn(tokens, k * p, generator=gen).to(torch.bfloat16)
        plan, _ = run_sim(sim_binary, tmp_path, x, w1, w2, sms=sms, smem=smem)
        mirror = cuda_cost.rowsplit_plan(tokens, shape, k * p, "bfloat16", sms, smem)
        if mirror is None:
            assert not plan["supported"], (tokens, shape, plan)
        else:
            assert plan["supported"] and plan["splits"] == mirror["splits"], (tokens, shape, plan, mirror)


def test_ragged_input_with_aligned_rows_takes_the_general_stage1(sim_binary, tmp_path):
    """n_in < k·p with otherwise vector-loadable rows: x_vec, but stage 1 must bound x (s1_vec off)."""
    gen = torch.Generator().manual_seed(13)
    k, q, p, l, s, r = 4, 8, 16, 4, 8, 8
    w1, w2 = factors(k, q, p, l, s, r, torch.bfloat16, gen)
    x = torch.randn(2, 56, generator=gen).to(torch.bfloat16)
    plan, out = run_sim(sim_binary, tmp_path, x, w1, w2)
    assert plan["x_vec"] == 1 and plan["s1_vec"] == 0
    assert_close(out, expected(x, w1, w2, None, l * s, "none"), torch.bfloat16)
