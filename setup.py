"""Build script: the packages (metadata in ``pyproject.toml``) plus the optional ``monarch_kernels._C`` extension
from ``csrc/``.

The extension is built when torch is importable at build time (install with ``--no-build-isolation`` so the
environment's torch is used) and a C++ compiler works; CUDA sources are added when torch has CUDA and
``nvcc`` is found. When it cannot be built the install is pure Python: this script prints a warning with the
reason and the fix (shown by ``pip install -v``; the layers warn again once at run time), the ``cpu``/``cuda``
backends report themselves unavailable with the reason, and ``MONARCH_KERNELS_REQUIRE_EXT=1`` turns the warning
into a build error. ``MONARCH_KERNELS_NO_EXT=1`` skips the extension on purpose (no warning).
``-march=native`` is used for the CPU kernels unless ``MONARCH_KERNELS_PORTABLE=1``.
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

def skip_extension(reason: str):
    """Report loudly that the install is pure Python (or fail with MONARCH_KERNELS_REQUIRE_EXT=1)."""
    message = (
        f"monarch-kernels: NOT building the C++/CUDA kernels: {reason}. The install is pure Python: every op runs "
        "on the (slower) PyTorch reference backend. Fix: install torch and a C++ compiler first, then "
        "`pip install --no-build-isolation monarch-kernels` (or `pip install --no-build-isolation -e .` in a "
        "checkout), so that the build sees the environment's torch."
    )
    if os.environ.get("MONARCH_KERNELS_REQUIRE_EXT") == "1":
        raise SystemExit(message)
    bar = "!" * 100
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr)
    warnings.warn(message, stacklevel=2)
    return [], {}


def extension_modules():
    if os.environ.get("MONARCH_KERNELS_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return skip_extension("no csrc/*.cpp sources in this source tree")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return skip_extension("torch is not importable at build time (an isolated build environment?)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return skip_extension(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) found")
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is set by torch.utils.cpp_extension
    if os.environ.get("MONARCH_KERNELS_PORTABLE") != "1":
        cxx.append("-march=native")  # the CPU micro-kernel relies on the host's vector width
    cu = (sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
          + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("MONARCH_KERNELS_NO_CUDA") == "1":
        with_cuda = False
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "monarch_kernels._C",
            cpp + cu,
            define_macros=[("MONARCH_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "monarch_kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

# Metadata (name, version, dependencies, extras) lives in pyproject.toml; this call adds the package layout and the
# extension. The layers/ folder is the subpackage monarch_kernels.layers; methods/ and bench/ run from the checkout.
setup(
    packages=find_packages(include=["monarch_kernels", "monarch_kernels.*"]) + ["monarch_kernels.layers"],
    package_dir={"monarch_kernels.layers": "layers"},
    package_data={"monarch_kernels": ["py.typed"], "monarch_kernels.layers": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
