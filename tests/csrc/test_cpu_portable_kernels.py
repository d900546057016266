"""The portable C++ kernels (the build without ``-march=native``: ``MONARCH_KERNELS_PORTABLE=1``, hosts without
AVX-512) are compiled for the x86-64 baseline and *run* against the float64 reference.

The installed extension is a native build whose float kernels use AVX-512 intrinsics where the host has them,
so its tests never reach the portable float kernels. Here ``csrc/monarch_cpu.cpp`` and ``csrc/ops.cpp`` are
compiled with ``-march=x86-64 -O1`` into a plain shared library (``MONARCH_KERNELS_NO_PYTHON_MODULE``: no
Python module), cached in ``build/portable-kernels`` under a hash of the sources and flags (about 30-60 s on two
idle cores when they changed). A child process loads it with ``torch.ops.load_library`` (the native extension
registers the same op namespace, so the two cannot share a process) and compares every op on both schedules,
both weight paths, ragged and strided inputs, with outputs poisoned by deterministic mode.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(ROOT, "csrc", name) for name in ("monarch_cpu.cpp", "ops.cpp")]
CXX = os.environ.get("CXX", "c++")
FLAGS = ["-std=c++17", "-O1", "-march=x86-64", "-fPIC", "-fopenmp", "-w", "-DMONARCH_KERNELS_NO_PYTHON_MODULE",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}"]


def build_portable_library(timeout: float = 900) -> str:
    """The portable kernels as a shared library, compiled once per version of the sources (no lock files: a
    concurrent or interrupted build at worst repeats the work; the result appears atomically)."""
    key = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            key.update(f.read())
    key.update(" ".join(FLAGS + [torch.__version__]).encode())
    out_dir = os.path.join(ROOT, "build", "portable-kernels")
    lib = os.path.join(out_dir, f"monarch_portable_{key.hexdigest()[:16]}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    tag = f"{os.getpid()}"
    objects = [os.path.join(out_dir, f"{os.path.basename(s)}.{tag}.o") for s in SOURCES]
    jobs = [subprocess.Popen([CXX, *FLAGS, "-c", src, "-o", obj], stderr=subprocess.PIPE, text=True)
            for src, obj in zip(SOURCES, objects)]  # both files at once
    for job in jobs:
        _, err = job.communicate(timeout=timeout)
        assert job.returncode == 0, err[-4000:]
    libdirs = cpp_extension.library_paths()
    tmp = f"{lib}.{tag}.tmp"
    link = [CXX, "-shared", "-fopenmp", *objects, "-o", tmp, *(f"-L{d}" for d in libdirs),
            *(f"-Wl,-rpath,{d}" for d in libdirs), "-lc10", "-ltorch_cpu", "-ltorch"]
    res = subprocess.run(link, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    os.replace(tmp, lib)
    for obj in objects:
        os.remove(obj)
    return lib


CHILD = r'''
import os, sys
import torch
sys.path.insert(0, os.environ["MONARCH_ROOT"])
from monarch_kernels import reference as ref

torch.ops.load_library(os.environ["MONARCH_PORTABLE_LIB"])
ops = torch.ops.monarch_kernels_ext
torch.use_deterministic_algorithms(True)  # fresh outputs start as NaN: every element must be written
torch.manual_seed(0)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
worst = {}

def check(name, got, want, dtype):
    assert got.shape == want.shape and got.dtype == dtype, (name, got.shape, want.shape, got.dtype)
    scale = want.abs().max().clamp_min(1e-300)
    err = ((got.double() - want).abs().max() / scale).item()
    worst[name] = max(worst.get(name, 0.0), err)
    assert err <= TOL[dtype], f"{name} {dtype}: per-element error {err:.3g}"

d = lambda t: t.double()
shapes = [((4, 12, 12), (4, 48, 12)), ((5, 5, 7), (5, 6, 5)), ((4, 40, 36), (5, 33, 32)), ((2, 1, 1), (1, 3, 2))]
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for s1, s2 in shapes:
        k, q, p = s1
        l, s, r = s2
        n_in, n_out = max(1, k * p - 3), max(1, l * s - 2)
        for T in (3, 70, 300):  # block-parallel / row tiles with weights in place / packed weights
            x = torch.randn(T, 2 * n_in)[:, ::2].to(dtype)  # strided columns
            g = torch.randn(T, n_out).to(dtype)
            w1, w2, b = torch.randn(s1).to(dtype), torch.randn(s2).to(dtype), torch.randn(n_out).to(dtype)
            check("monarch_fwd", ops.monarch_fwd(x, w1, w2, b, n_out, 3),
                  ref.monarch_fwd(d(x), d(w1), d(w2), d(b), n_out, "gelu_tanh"), dtype)
            check("monarch_bwd_input", ops.monarch_bwd_input(g, w1, w2, n_in),
                  ref.monarch_bwd_input(d(g), d(w1), d(w2), n_in), dtype)
            for name, got, want in zip(("dw1", "dw2"), ops.monarch_bwd_weight(x, g, w1, w2),
                                       ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2))):
                check("monarch_bwd_weight." + name, got, want, dtype)
            for name, got, want in zip(("dx", "dw1", "dw2"), ops.monarch_bwd(x, g, w1, w2, n_in),
                                       ref.monarch_bwd(d(x), d(g), d(w1), d(w2), n_in)):
                check("monarch_bwd." + name, got, want, dtype)
            nb_out = max(1, k * q - 1)
            gb = torch.randn(T, nb_out).to(dtype)
            check("blockdiag_fwd", ops.blockdiag_fwd(x, w1, b[:1].expand(nb_out).contiguous(), nb_out, 1),
                  ref.blockdiag_fwd(d(x), d(w1), d(b[:1]).expand(nb_out), nb_out, "relu"), dtype)
            check("blockdiag_wgrad", ops.blockdiag_wgrad(x, gb, k, q, p),
                  ref.blockdiag_wgrad(d(x), d(gb), k, q, p), dtype)
print("portable kernels OK; worst per-element errors:", {k: f"{v:.1e}" for k, v in sorted(worst.items())})
'''


@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86-64 baseline target exists on x86 hosts only")
def test_portable_cpu_kernels_match_the_reference():
    lib = build_portable_library()
    env = dict(os.environ, MONARCH_ROOT=ROOT, MONARCH_PORTABLE_LIB=lib, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    assert "portable kernels OK" in res.stdout
