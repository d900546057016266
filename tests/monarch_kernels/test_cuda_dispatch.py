"""``auto`` picks the CUDA backend for few-token calls on a GPU (checked on CPU: fake CUDA tensors, the backend's
load and the device's shared-memory query patched)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import monarch_kernels as mk
from monarch_kernels import backends, cuda_dispatch, gpu_dispatch

H100_SMEM_OPTIN = 232448


@pytest.fixture
def fake_gpu(monkeypatch):
    """The ``cuda`` backend loaded, an H100's shared memory, and a factory of fake CUDA tensors."""
    cuda = backends.get("cuda")
    monkeypatch.setattr(cuda, "_module", object())
    monkeypatch.setattr(cuda, "_loaded", True)
    monkeypatch.setattr(cuda_dispatch, "_shared_memory_optin", lambda index: H100_SMEM_OPTIN)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def make(*shape, dtype):
        with mode:
            return torch.empty(*shape, device="cuda", dtype=dtype)

    return make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,nblocks", [(2048, 4), (4096, 64), (8192, 4)])
def test_few_tokens_pick_cuda(fake_gpu, dtype, n, nblocks):
    sh = mk.monarch_factor_shapes(n, n, nblocks)
    w1, w2 = fake_gpu(*sh.w1_shape, dtype=dtype), fake_gpu(*sh.w2_shape, dtype=dtype)
    for tokens in (1, 4, 16):  # one launch against Triton's two: predicted faster at every such shape
        assert mk.resolve_backend("monarch", fake_gpu(tokens, n, dtype=dtype), w1, w2) == "cuda", tokens
    limit = cuda_dispatch.DECODE_MAX_TOKENS[dtype]
    assert mk.resolve_backend("monarch", fake_gpu(limit + 1, n, dtype=dtype), w1, w2) != "cuda"


def test_the_rule_follows_the_cost_model(fake_gpu):
    # 64 tokens of 4096 -> 4096 in 4 blocks: each task re-stages 64 rows of a 1024-wide input from L2, so
    # Triton's device time is predicted shorter (at 16 tokens the decode kernel's is)
    sh = mk.monarch_factor_shapes(4096, 4096, 4)
    w1, w2 = fake_gpu(*sh.w1_shape, dtype=torch.bfloat16), fake_gpu(*sh.w2_shape, dtype=torch.bfloat16)
    dims = (64, 4096, 4096, 1024)
    assert gpu_dispatch.fastest("monarch", torch.bfloat16, dims, ["cuda", "triton", "torch"], eager=False) == "triton"
    # eager, the extension's 50 µs of host time per call beats Triton's ~357 (gpu_dispatch.HOST_S)
    assert mk.resolve_backend("monarch", fake_gpu(64, 4096, dtype=torch.bfloat16), w1, w2) == "cuda"
    assert mk.resolve_backend("monarch", fake_gpu(16, 4096, dtype=torch.bfloat16), w1, w2) == "cuda"
    dims = (64, 4096, 4096, 64)
    assert gpu_dispatch.fastest("monarch", torch.bfloat16, dims, ["cuda", "triton", "torch"], eager=False) == "cuda"


def test_blockdiag_follows_the_model(fake_gpu, monkeypatch):
    w = fake_gpu(4, 256, 512, dtype=torch.bfloat16)
    x = fake_gpu(3, 2048, dtype=torch.bfloat16)
    # one decode stage and Triton's one grouped launch move the same bytes: a tie keeps the incumbent
    assert mk.resolve_backend("blockdiag", x, w) == "triton"
    monkeypatch.setattr(gpu_dispatch, "predicted_seconds", lambda *args: 1.0)  # every rival predicted at 1 s
    assert mk.resolve_backend("blockdiag", x, w) == "cuda"
    assert mk.resolve_backend("blockdiag", fake_gpu(300, 2048, dtype=torch.bfloat16), w) != "cuda"


def test_blocks_too_wide_for_shared_memory_go_elsewhere(fake_gpu):
    # 64 token rows of a 2048-wide bf16 block need 64 * (2080 * 2 + 1152) bytes > 227 KiB; 16 rows fit
    w1, w2 = fake_gpu(2, 2048, 2048, dtype=torch.bfloat16), fake_gpu(2, 2048, 2048, dtype=torch.bfloat16)
    assert mk.resolve_backend("monarch", fake_gpu(64, 4096, dtype=torch.bfloat16), w1, w2) != "cuda"
    assert mk.resolve_backend("monarch", fake_gpu(16, 4096, dtype=torch.bfloat16), w1, w2) == "cuda"


def test_rule_declines_other_devices_and_dtypes():
    dims = (4, 1024, 1024, 256)
    assert not cuda_dispatch.prefers_cuda("monarch", torch.device("cpu"), torch.bfloat16, dims)
    assert not cuda_dispatch.prefers_cuda("monarch", torch.device("cuda", 0), torch.float64, dims)
    assert not cuda_dispatch.prefers_cuda("monarch", torch.device("cuda", 0), torch.bfloat16, (0, 1024, 1024, 256))


def test_smem_bound_grows_with_tokens_and_block():
    small = cuda_dispatch.decode_smem_bytes(torch.bfloat16, 16, 1024)
    assert small == 16 * ((1024 + 32) * 2 + 1152)
    assert cuda_dispatch.decode_smem_bytes(torch.bfloat16, 17, 1024) == 2 * small
    assert cuda_dispatch.decode_smem_bytes(torch.float32, 1, 1024) == 16 * ((1024 + 32) * 4 + 1152)


def test_auto_prices_a_training_call_as_a_training_step(fake_gpu):
    """The same fake-GPU call resolves to the reference for inference and to Triton when autograd records it
    (the cost model predicts Triton's forward slower and its forward+backward faster at this shape: 8192 wide,
    2 blocks of 4096, 2048 tokens)."""
    sh = mk.monarch_factor_shapes(8192, 8192, 2)
    w1, w2 = fake_gpu(*sh.w1_shape, dtype=torch.bfloat16), fake_gpu(*sh.w2_shape, dtype=torch.bfloat16)
    x = fake_gpu(2048, 8192, dtype=torch.bfloat16)
    assert mk.resolve_backend("monarch", x, w1, w2) == "torch"
    assert mk.resolve_backend("monarch", x, w1.requires_grad_(), w2) == "triton"
    with torch.no_grad():
        assert mk.resolve_backend("monarch", x, w1, w2) == "torch"


def test_few_token_training_calls_avoid_the_unpriced_cuda_backward(fake_gpu):
    """At 4 tokens ``auto`` takes the decode kernels for inference, but a call autograd records would run the
    CUDA weight gradients too, which the cost model does not price: it goes to a priced backend instead."""
    sh = mk.monarch_factor_shapes(4096, 4096, 64)
    w1, w2 = fake_gpu(*sh.w1_shape, dtype=torch.bfloat16), fake_gpu(*sh.w2_shape, dtype=torch.bfloat16)
    x = fake_gpu(4, 4096, dtype=torch.bfloat16)
    assert mk.resolve_backend("monarch", x, w1, w2) == "cuda"
    assert mk.resolve_backend("monarch", x, w1.requires_grad_(), w2) in ("triton", "torch")
    w = fake_gpu(4, 256, 512, dtype=torch.bfloat16)
    xb = fake_gpu(3, 2048, dtype=torch.bfloat16)
    assert not cuda_dispatch.prefers_cuda("blockdiag", xb.device, torch.bfloat16, (3, 2048, 1024, 512), training=True)
    assert mk.resolve_backend("blockdiag", xb.requires_grad_(), w) != "cuda"


@pytest.mark.parametrize("n_in", [2048, 2000, 1537])
def test_blockdiag_is_priced_with_the_factors_block_count(fake_gpu, monkeypatch, n_in):
    """A block-diagonal call with a ragged input (``n_in < k·p``, zero-padded) is priced as the factor's ``k``
    blocks of ``q x p`` (``k = ceil(n_in / p)``), not as one block fewer."""
    from monarch_kernels import cuda_cost

    seen, real = [], cuda_cost.blockdiag_kernel
    monkeypatch.setattr(cuda_cost, "blockdiag_kernel", lambda *a: seen.append(a[:4]) or real(*a))
    w = fake_gpu(4, 256, 512, dtype=torch.bfloat16)
    mk.resolve_backend("blockdiag", fake_gpu(3, n_in, dtype=torch.bfloat16), w)
    assert seen == [(3, 4, 256, 512)]
