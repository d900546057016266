import math
import os
import sys
from collections import Counter
from typing import Optional

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


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: Optional[float] = None) -> float:
    """Per-element error relative to the output scale: ``max_i |actual_i − expected_i| / scale`` over the
    finite entries of ``expected``, in float64 (complex128 for complex); ``scale`` defaults to
    ``max_i |expected_i|``.

    One wrong element shows at full size (a global norm would dilute it by the square root of the element
    count). Non-finite entries of ``expected`` must be matched exactly (NaN by NaN, ±Inf by the same
    infinity), and ``actual`` must not be non-finite anywhere else; otherwise the error is ``inf``. The
    shapes must be equal (no broadcasting).
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    wide = torch.complex128 if expected.is_complex() else torch.float64
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    finite = torch.isfinite(e)
    if not finite.all() or not torch.isfinite(a).all():
        same_nan = torch.isnan(a) == torch.isnan(e)
        same_inf = torch.where(torch.isinf(e), a == e, ~torch.isinf(a))
        if not (same_nan & same_inf).all():
            return math.inf
        a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    if scale is None:
        scale = e.abs().max().item()
    return (a - e).abs().max().item() / max(scale, 1e-300)


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


@pytest.fixture(autouse=True)
def _default_backend():
    """Reset the process-wide default backend to ``auto`` after every test: a test that sets another one and
    fails midway must not change what later tests run on."""
    yield
    import monarch_kernels as mk

    if mk.get_backend() != "auto":
        mk.set_backend("auto")


#: test files whose module- or session-scoped fixtures are expensive (the nvcc compiles, the offline kernel audit,
#: the CUDA emulation binary the two simulation files share, its ThreadSanitizer build, a copy of the source tree,
#: a recipe run): with ``--dist loadgroup`` (``make test``) each group runs in one pytest-xdist worker, so its
#: fixtures run once
_ONE_WORKER = {"test_cuda_sources_compile.py": "nvcc", "test_kernel_audit.py": "kernel_audit",
               "test_cuda_resident_sim.py": "cuda_sim", "test_cuda_rowsplit_sim.py": "cuda_sim",
               "test_cuda_sim_races.py": "cuda_sim_tsan",
               "test_packaging.py": "packaging", "test_depthshrinker.py": "depthshrinker"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        group = _ONE_WORKER.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """xdist controller, ``--dist loadgroup``: each grouped test's id must carry its ``@group`` suffix, the one
    channel through which xdist hands a group to its scheduler. pytest >= 9.2 no longer lets xdist set it
    (pytest-dev/pytest-xdist#1386): the tests would still pass, spread over both workers, each building every
    expensive fixture once more (about a minute and a half of CI), so the run stops here and says why."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    lost = [i for i in ids if os.path.basename(i.split("::")[0]) in _ONE_WORKER and "@" not in i]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): this "
                                f"pytest-xdist cannot set node ids on pytest {pytest.__version__} (pytest-xdist#1386); "
                                "install the pytest that requirements-dev.txt pins")


#: hypothesis example counts that pytest-xdist workers reported to this (controlling) process
_WORKER_EXAMPLES: Counter = Counter()


def _examples() -> Counter:
    """The number of hypothesis examples per ``(op, backend)`` that tests/monarch_kernels/test_properties.py ran
    in this process."""
    return getattr(sys.modules.get("test_properties"), "EXAMPLES", None) or Counter()


def pytest_sessionfinish(session):
    """An xdist worker hands its counts to the controller (``workeroutput`` travels back with the worker)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["hypothesis_examples"] = [[op, b, n] for (op, b), n in _examples().items()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: add up what a finished worker counted."""
    for op, b, n in getattr(node, "workeroutput", {}).get("hypothesis_examples", []):
        _WORKER_EXAMPLES[(op, b)] += n


def pytest_terminal_summary(terminalreporter):
    """The number of hypothesis examples per op and backend that tests/monarch_kernels/test_properties.py ran
    (over every xdist worker)."""
    counts = _examples() + _WORKER_EXAMPLES
    if not counts:
        return
    backends = sorted({b for _, b in counts})
    terminalreporter.write_sep("-", "hypothesis examples per op and backend")
    terminalreporter.write_line(f"{'op':<20}" + "".join(f"{b:>10}" for b in backends))
    for op in sorted({o for o, _ in counts}):
        terminalreporter.write_line(f"{op:<20}" + "".join(f"{counts[(op, b)]:>10}" for b in backends))


@pytest.fixture
def poisoned_allocations():
    """Within the test, fresh tensor allocations start as NaN (``torch.use_deterministic_algorithms``'s memory
    fill): a kernel that leaves an output element unwritten fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(scope="session")
def sim_binary(tmp_path_factory):
    """The CUDA emulation of the Monarch forward kernels (``tests/cuda_sim/fwd_main.cpp``, every kernel it runs),
    built once per test session (a sanitizer build takes ~20 s); its tests skip without g++ and the CUDA headers
    (``sim_harness.needs_sim``)."""
    from sim_harness import build

    return build(tmp_path_factory.mktemp("fwd_sim"))


@pytest.fixture(scope="session")
def sim_tsan_binary(tmp_path_factory):
    """The same emulation under ThreadSanitizer (``tests/csrc/test_cuda_sim_races.py``): a run fails where two
    emulated threads touch one location unordered by the kernel's barriers."""
    from sim_harness import build

    return build(tmp_path_factory.mktemp("fwd_sim_tsan"), "thread")
