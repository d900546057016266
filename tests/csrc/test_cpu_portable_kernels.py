"""The CPU kernels also compile without ``-march=native`` (MONARCH_KERNELS_PORTABLE=1 builds, hosts without
AVX-512): the intrinsics paths are guarded and the portable kernels stand alone. Syntax check only; the
installed extension (native build) is what the kernel tests run."""
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86-64 baseline target exists on x86 hosts only")
def test_cpu_kernels_compile_for_the_x86_64_baseline():
    cmd = ["g++", "-std=c++17", "-fopenmp", "-fsyntax-only", "-Werror=return-type", "-march=x86-64",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           os.path.join(ROOT, "csrc", "monarch_cpu.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
