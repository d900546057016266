"""Registration of the built-in backends (imported once by the package).

========  ==========================  ===============================================================
name      devices / dtypes            implementation
========  ==========================  ===============================================================
torch     any / any                   :mod:`monarch_kernels.reference` (bmm + permutes), the oracle
triton    CUDA / fp16, bf16, fp32     :mod:`monarch_kernels.triton` (CPU too under TRITON_INTERPRET=1)
cuda      CUDA / fp16, bf16, fp32     ``csrc/cuda`` via :mod:`monarch_kernels.ext`; auto: few tokens only
========  ==========================  ===============================================================

``auto`` tries backends by descending priority and takes the first that is available, supports the
tensors and prefers the call's shape.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .backends import Backend, register_backend

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"triton is not installed ({exc})") from exc
    if not (torch.cuda.is_available() or _interpreting()):
        raise RuntimeError("no CUDA device; set TRITON_INTERPRET=1 before importing to run the kernels on CPU")
    from . import triton as module

    return module


def _triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    on_device = device.type == "cuda" or (device.type == "cpu" and _interpreting())
    return on_device and dtype in _TRITON_DTYPES


register_backend(Backend(
    name="torch", load=lambda: reference, supports=lambda device, dtype: True, priority=0,
    description="pure PyTorch reference (two bmm + permutes); every device and dtype, float64 oracle",
))
def _triton_prefers(op: str, device: torch.device, dtype: torch.dtype, dims: tuple, training: bool = False) -> bool:
    """Whether ``auto`` takes Triton on this call: on CUDA when the cost model predicts it faster than the torch
    reference and the other available GPU backends (:mod:`monarch_kernels.gpu_dispatch`) — for a training call
    by forward plus backward; never on CPU (the interpreter is for tests)."""
    if device.type != "cuda":
        return False
    from . import backends
    from .gpu_dispatch import prefers

    status = backends.available_backends()
    others = [n for n in ("cuda",) if status.get(n) == "available" and backends.get(n).supports(device, dtype)]
    return prefers("triton", op, dtype, dims, others, training)


def _triton_prefers_training(op: str, device: torch.device, dtype: torch.dtype, dims: tuple) -> bool:
    return _triton_prefers(op, device, dtype, dims, training=True)


register_backend(Backend(
    name="triton", load=_load_triton, supports=_triton_supports, priority=20, prefer=_triton_prefers,
    prefer_training=_triton_prefers_training,
    description="Triton kernels: coalesced grouped permutations, fused square forward, fused backward",
))


def _load_cpu():
    from . import ext

    ext.load()
    return ext.Primitives


def _load_cuda():
    from . import ext

    if not ext.built_with_cuda():
        raise RuntimeError("the extension was built without CUDA "
                           "(needs a CUDA build of torch and nvcc at install time)")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    return ext.Primitives


def _cpu_prefers(op: str, device: torch.device, dtype: torch.dtype, dims: tuple) -> bool:
    """Whether ``auto`` takes the C++ kernels over the torch reference on CPU (the measured rule in
    ``cpu_dispatch.py``)."""
    from .cpu_dispatch import prefers_cpu_kernel

    return prefers_cpu_kernel(op, dtype, dims)


register_backend(Backend(
    name="cpu", load=_load_cpu, supports=lambda device, dtype: device.type == "cpu" and dtype in _CPU_DTYPES,
    prefer=_cpu_prefers, priority=10,
    description="compiled C++ kernels: row tiles with the intermediate in cache, register-blocked micro-kernel",
))
def _cuda_prefers(op: str, device: torch.device, dtype: torch.dtype, dims: tuple) -> bool:
    """Whether ``auto`` takes the CUDA kernels: the few-token decode path only (rule in ``cuda_dispatch.py``)."""
    from .cuda_dispatch import prefers_cuda

    return prefers_cuda(op, device, dtype, dims)


def _cuda_prefers_training(op: str, device: torch.device, dtype: torch.dtype, dims: tuple) -> bool:
    from .cuda_dispatch import prefers_cuda

    return prefers_cuda(op, device, dtype, dims, training=True)


# above triton, but preferred only for the few-token calls its decode kernels serve (T <= 64; fp32 T <= 16)
register_backend(Backend(
    name="cuda", load=_load_cuda, supports=lambda device, dtype: device.type == "cuda" and dtype in _TRITON_DTYPES,
    prefer=_cuda_prefers, prefer_training=_cuda_prefers_training, priority=25,
    description="compiled CUDA kernels: one-launch small-token (decode) Monarch/block-diagonal kernels streaming "
                "the weights once; when asked for explicitly, resident many-token forwards (factors on chip; "
                "training calls keep the intermediate for the Triton backward) and tile kernels (WMMA)",
))
