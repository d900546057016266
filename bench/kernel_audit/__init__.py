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

#: part name -> ``fn(scope: str, dtypes: tuple, progress) -> list[KernelRow]`` with ``scope`` one of ``full``,
#: ``quick`` (three shapes) or ``ci`` (one launch per kernel family)
PARTS: dict[str, Callable[..., list[KernelRow]]] = {}


def register_part(name: str, fn: Callable[..., list[KernelRow]]) -> None:
    PARTS[name] = fn


def _triton(scope: str, dtypes: tuple, progress) -> list[KernelRow]:
    from . import triton_part
    from .offline import offline_target_problem

    problem = offline_target_problem()
    if problem:
        return [KernelRow("triton", "-", "-", "-", error=f"skipped: {problem}")]
    if scope == "ci":
        cases = triton_part.ci_cases()
    else:
        shapes = triton_part.QUICK_SHAPES if scope == "quick" else triton_part.SHAPES
        cases = triton_part.monarch_cases(shapes, dtypes)
    return triton_part.audit(cases, progress=progress)


def _cuda(scope: str, dtypes: tuple, progress) -> list[KernelRow]:
    from . import cuda_part

    return cuda_part.audit(progress=progress)


register_part("triton", _triton)
register_part("cuda", _cuda)

__all__ = ["KernelRow", "PARTS", "register_part"]
