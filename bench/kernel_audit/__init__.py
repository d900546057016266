"""Kernel audit: every GPU kernel the dispatcher can launch, compiled for sm_90 on a machine without a GPU.

``python -m bench.kernel_audit`` prints one row per distinct compiled kernel (registers, spills, shared memory,
tensor-core instruction, widest global load/store per operand) and writes ``audit.json``/``audit.md`` to
``bench/results/kernel_audit/``; ``--model`` adds the cost-model predictions (:mod:`.model`).

Parts (a name -> function returning :class:`~.rows.KernelRow` rows): ``triton`` (:mod:`.triton_part`: the
Triton backend's host functions run on ``meta`` tensors with compile-only launches) and ``cuda``
(:mod:`.cuda_part`: ``nvcc`` + ``cuobjdump`` over ``csrc/cuda``). Another backend adds its own with
:func:`register_part`.
"""
from __future__ import annotations

from typing import Callable

from .rows import KernelRow

#: part name -> ``fn(quick: bool, dtypes: tuple, progress) -> list[KernelRow]``
PARTS: dict[str, Callable[..., list[KernelRow]]] = {}


def register_part(name: str, fn: Callable[..., list[KernelRow]]) -> None:
    PARTS[name] = fn


def _triton(quick: bool, dtypes: tuple, progress) -> list[KernelRow]:
    from . import triton_part
    from .offline import offline_target_problem

    problem = offline_target_problem()
    if problem:
        return [KernelRow("triton", "-", "-", "-", error=f"skipped: {problem}")]
    shapes = triton_part.QUICK_SHAPES if quick else triton_part.SHAPES
    return triton_part.audit(triton_part.monarch_cases(shapes, dtypes), progress=progress)


def _cuda(quick: bool, dtypes: tuple, progress) -> list[KernelRow]:
    from . import cuda_part

    return cuda_part.audit(progress=progress)


register_part("triton", _triton)
register_part("cuda", _cuda)

__all__ = ["KernelRow", "PARTS", "register_part"]
