"""Every CUDA source compiles with the machine's nvcc for sm_80 and sm_90 (compile only: no GPU needed).

The kernels in csrc/cuda/*.cu are plain CUDA (no torch headers), so this catches CUDA code that does not
compile on every CI machine; the torch binding (csrc/cuda/cuda_ops.cpp) is built with a CUDA torch by
``make cuda-build-check`` (which also compiles a separate compute_90 PTX, as setup.py does).

To keep CI short, each source goes through the front end once (compute_80 PTX, which both targets run) and
ptxas assembles it for sm_80 and sm_90; all sources compile at once, since the rest of the suite is serial.
"""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC_FLAGS = ["-c", "-std=c++17", "-O3", "--threads", "2", "-gencode=arch=compute_80,code=[sm_80,sm_90]"]


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """source -> (running nvcc, object path), every compile started before the first is awaited."""
    out = tmp_path_factory.mktemp("cuda_objects")
    running = {}
    for source in SOURCES:
        obj = out / (os.path.basename(source) + ".o")
        running[source] = (subprocess.Popen(["nvcc", *NVCC_FLAGS, source, "-o", str(obj)], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True), obj)
    yield running
    for proc, _ in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cu_compiles_for_sm80_and_sm90(source, compiles):
    proc, obj = compiles[source]
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    assert obj.stat().st_size > 0
    if shutil.which("cuobjdump"):  # not every toolkit install has it on PATH
        listing = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True, check=True)
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


def test_cuda_sources_exist():
    assert SOURCES, "no CUDA sources found in csrc/cuda"
