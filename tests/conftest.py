import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the variable must be set before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests import the in-tree packages (also when not installed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: relative-error tolerances per dtype when comparing with a float64 reference
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2,
        torch.complex128: 1e-12, torch.complex64: 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ computed in float64 (complex128 for complex)."""
    wide = torch.complex128 if expected.is_complex() else torch.float64
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while active (``names``), e.g. to see which custom ops ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
