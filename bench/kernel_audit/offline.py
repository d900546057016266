"""Compile Triton kernels for a GPU that is not there: a fake CUDA driver and compile-only launches.

Triton picks its code generator from ``triton.runtime.driver.active.get_current_target()``. Making a small
:class:`triton.backends.driver.DriverBase` subclass active whose target is ``GPUTarget("cuda", 90, 32)`` lets the
real NVIDIA backend lower every kernel to TTGIR, PTX and a cubin (ptxas ships with triton) on a machine with no
GPU and no CUDA driver. :func:`compile_only` then intercepts launches: ``kernel[grid](...)`` compiles (the
JIT's ``warmup`` path) and records the kernel instead of launching it, so the library's own host functions
(``forward``, ``backward_input``, ...) can be run on ``meta`` tensors and the audit sees exactly the
kernels and compile-time configurations they would launch. Autotuned kernels compile every candidate config.

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions at import).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Launch:
    """One intercepted launch: the compiled kernel (``None`` when only counting), the grid the host asked for
    and a key that identifies the compiled specialisation (kernel, compile-time arguments, argument dtypes
    and the integer properties Triton specialises on)."""

    kernel: object  # triton.compiler.CompiledKernel
    fn_name: str
    grid: tuple
    constexprs: dict = field(default_factory=dict)
    key: tuple = ()


def _spec(arg, specialize: bool = True) -> str:
    """How Triton specialises one launch argument (dtype of a tensor; an int's ``== 1`` / ``% 16 == 0``, unless
    the kernel says ``do_not_specialize`` for it: ``specialize`` false)."""
    if hasattr(arg, "dtype"):
        return str(arg.dtype)
    if isinstance(arg, bool) or arg is None:
        return repr(arg)
    if isinstance(arg, int):
        return "int" if not specialize else "1" if arg == 1 else "d16" if arg % 16 == 0 else "i"
    return type(arg).__name__


def _fake_driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class OfflineCudaDriver(DriverBase):
        """Target description only: no device, no stream, no launcher, no benchmarking."""

        def __init__(self, capability: int = 90):
            super().__init__()
            self.capability = capability

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", self.capability, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("offline compilation: no GPU to benchmark on")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(self.capability, 10)

    return OfflineCudaDriver


def offline_target_problem() -> Optional[str]:
    """``None`` when this triton can compile for sm_90 offline, else the reason (to skip tests cleanly)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: @triton.jit functions are interpreted, not compiled"
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
        from triton.backends.driver import DriverBase  # noqa: F401
        import triton.runtime.driver  # noqa: F401
    except ImportError as exc:
        return f"triton cannot target CUDA offline here ({exc})"
    return None


@contextlib.contextmanager
def compile_only(capability: int = 90, on_launch: Optional[Callable[[Launch], None]] = None,
                 count_only: bool = False):
    """Within the block, Triton compiles for ``sm_<capability>`` and every launch only compiles (with
    ``count_only``, not even that: launches are recorded with their compile key, nothing is built).

    Yields the list of :class:`Launch` records (also passed to ``on_launch`` as they happen).
    """
    import triton
    from triton.runtime import autotuner, jit

    problem = offline_target_problem()
    if problem:
        raise RuntimeError(problem)
    launches: list[Launch] = []
    config = triton.runtime.driver
    previous_driver = getattr(config, "_active", None)  # reading .active would build the real (absent) driver
    original_run = jit.JITFunction.run
    original_autotune_run = autotuner.Autotuner.run

    def record(fn, kernel, grid, args, kwargs):
        constexprs = {k: v for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode",
                                                                    "fpsan_homomorphic_casts")}
        specs = tuple(_spec(a, not p.do_not_specialize) for a, p in zip(args, fn.params))
        key = (fn.__name__, tuple(sorted((k, repr(v)) for k, v in constexprs.items())), specs)
        rec = Launch(kernel=kernel, fn_name=fn.__name__, grid=grid, constexprs=constexprs, key=key)
        launches.append(rec)
        if on_launch is not None:
            on_launch(rec)

    def run(self, *args, grid, warmup, **kwargs):
        kernel = None if count_only else original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup and (kernel is not None or count_only):
            record(self, kernel, grid, args, kwargs)
        return kernel

    def autotune_run(self, *args, **kwargs):
        # compile every candidate (no benchmarking offline); report each
        self.nargs = dict(zip(self.arg_names, args))
        kernel = None
        for config in self.prune_configs(kwargs):
            kernel = self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None
        return kernel

    config.set_active(_fake_driver_class()(capability))
    jit.JITFunction.run = run
    autotuner.Autotuner.run = autotune_run
    try:
        yield launches
    finally:
        jit.JITFunction.run = original_run
        autotuner.Autotuner.run = original_autotune_run
        config._active = previous_driver
