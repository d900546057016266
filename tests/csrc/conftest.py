"""Shared fixtures of the compiled-code tests."""
import pytest


@pytest.fixture(scope="session")
def sim_binary(tmp_path_factory):
    """The CUDA emulation of the Monarch forward kernels (``tests/cuda_sim/fwd_main.cpp``, every kernel it runs),
    built once per test session (a sanitizer build takes ~20 s)."""
    from sim_harness import build

    return build(tmp_path_factory.mktemp("fwd_sim"))
