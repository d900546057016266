"""Builds and runs ``tests/cuda_sim/fwd_main.cpp``: a CUDA Monarch forward kernel (its own source) on the CPU.

``tests/cuda_sim/sim.h`` emulates the CUDA execution model (a std::thread per CUDA thread, barriers for
``__syncthreads``, warp shuffles and ``mma.sync``), so g++ compiles the kernel's plan, indexing, permutations,
fragment layouts, rounding and epilogue with address and undefined-behaviour sanitizers, and the tests compare
its output per element with the float64 reference, outputs poisoned and shared memory NaN-poisoned (a cp.async
destination too, until its wait). ``build(..., "thread")`` makes the same emulation under ThreadSanitizer, which
fails a run where a barrier is missing (``tests/csrc/test_cuda_sim_races.py``). What this cannot check (the
device's real loads, the order of one thread's copies among themselves, fences between CTAs, occupancy, speed)
is left to ``bench/gpu_check.sh``.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from monarch_kernels import reference
from monarch_kernels.activations import CODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
H100_SMS, H100_SMEM = 132, 232448

needs_sim = pytest.mark.skipif(
    shutil.which("g++") is None or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
    reason="needs g++ and the CUDA toolkit's headers (cuda_bf16.h) to build the CPU emulation",
)


def build(directory, sanitize: str = "address,undefined", kernels: str = os.path.join(ROOT, "csrc", "cuda")
          ) -> str:
    """Compiles the emulation of the kernels in ``kernels`` into ``directory`` with the ``sanitize`` sanitizers
    (``"thread"``: ThreadSanitizer, which reports two threads' unordered accesses to one location, e.g. a missing
    ``__syncthreads``, and fails the run); returns the executable's path."""
    exe = os.path.join(str(directory), "fwd_sim_" + sanitize.replace(",", "_"))
    recover = ["-fno-sanitize-recover=undefined"] if "undefined" in sanitize else []
    cmd = ["g++", "-std=c++20", "-O1", "-g", f"-fsanitize={sanitize}", *recover,
           "-Wno-attributes", "-DMONARCH_CUDA_SIM", f"-I{CUDA_INCLUDE}", f"-I{kernels}",
           "-include", f"{ROOT}/tests/cuda_sim/sim.h", f"{ROOT}/tests/cuda_sim/fwd_main.cpp", "-pthread",
           "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(BITS[t.dtype]).numpy().tobytes()


def run_sim(exe, kernel, tmp_path, x, w1, w2, bias=None, n_out=None, act="none", misalign=False, sms=H100_SMS,
            smem=H100_SMEM, keep_z=False, plan_only=False):
    """(plan dict, output tensor or None) of ``kernel`` ("rowsplit", "resident" or "cluster") on x (any
    strides); with ``keep_z`` (the kernel keeps the intermediate) ``(plan, output, z)``, ``z (T, k·q)``; with
    ``plan_only`` ``(plan, None)``: the kernel's host plan alone, nothing emulated."""
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
    args = [f"plan:{kernel}" if plan_only else kernel, DTYPES[x.dtype], tokens, k, q, p, l, s, r, n_in, n_out,
            x_ts, x_fs, CODES[act],
            int(bias is not None), sms, smem, int(misalign), int(keep_z)]
    proc = subprocess.run([exe, *map(str, args), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)
    if plan_only or not plan["supported"]:
        return (plan, None, None) if keep_z else (plan, None)
    out = _read(tmp_path / "out.bin", x.dtype, (tokens, n_out))
    return (plan, out, _read(tmp_path / "z.bin", x.dtype, (tokens, k * q))) if keep_z else (plan, out)


def _read(path, dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=BITS[dtype]).view(dtype).reshape(shape)


def expected(x, w1, w2, bias, n_out, act):
    d = torch.float64
    return reference.monarch_fwd(x.to(d), w1.to(d), w2.to(d), None if bias is None else bias.to(d), n_out, act)


def expected_z(x, w1, w2):
    """The stage-1 intermediate in stage 2's input order, ``(T, l·r)``: column ``ll·r + rr``, in float64."""
    d = torch.float64
    l, _, r = w2.shape
    return reference._stage1(x.to(d), w1.to(d), l, r).permute(1, 0, 2).reshape(x.shape[0], l * r)


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
