"""Build script: pure-Python packages plus the optional ``monarch_kernels._C`` extension from ``csrc/``.

The extension is built when torch is importable at build time (install with ``--no-build-isolation`` so the
environment's torch is used) and a C++ compiler works; CUDA sources are added when torch has CUDA and
``nvcc`` is found. Without a compiler, or with ``MONARCH_KERNELS_NO_EXT=1``, the install is pure Python and
the ``cpu``/``cuda`` backends report themselves unavailable with the reason. ``-march=native`` is used for
the CPU kernels unless ``MONARCH_KERNELS_PORTABLE=1``.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("MONARCH_KERNELS_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("monarch-kernels: torch not importable at build time; skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("monarch-kernels: no C++ compiler found; skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is set by torch.utils.cpp_extension
    if os.environ.get("MONARCH_KERNELS_PORTABLE") != "1":
        cxx.append("-march=native")  # the CPU micro-kernel relies on the host's vector width
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
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

setup(
    name="monarch-kernels",
    version="0.1.0",
    description="Triton and C++/CUDA kernels for Monarch and block-diagonal matrices, drop-in layers and recipes",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the layers/ folder is the subpackage monarch_kernels.layers; methods/ and bench/ run from the checkout only
    packages=find_packages(include=["monarch_kernels", "monarch_kernels.*"]) + ["monarch_kernels.layers"],
    package_dir={"monarch_kernels.layers": "layers"},
    package_data={"monarch_kernels": ["py.typed"]},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "safetensors"],
    extras_require={"triton": ["triton>=3.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
