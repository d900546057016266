"""When ``auto`` takes the compiled CUDA kernels (the ``cuda`` backend) on a GPU.

Only the small-token ("decode") kernels of ``csrc/cuda/decode.cu`` are candidates: with T ≤ 64 tokens (16 in fp32)
a Monarch or block-diagonal product is bound by reading the weights once and by launch latency, and those kernels
run both Monarch stages in one cooperative launch, stream each weight once with 16-byte loads and keep the token
rows in shared memory. Among the calls they can take, ``auto`` picks ``cuda`` where the cost model
(:mod:`.cost_model`, with the decode estimator of :mod:`.cuda_cost`) predicts it faster than the other available GPU
backends and the torch reference (:func:`.gpu_dispatch.prefers`) — e.g. one launch against the two of the Triton
path at T ≤ 16. These are predictions: no GPU timing exists yet.

Larger calls never go to ``cuda``: its tile kernels (``csrc/cuda/monarch_kernels.cu``: 64 x 64 WMMA tiles without
``cp.async`` or a pipeline, 2-byte global accesses, and a fused Monarch kernel that recomputes stage 1 once per
output tile) are predicted below the Triton kernels and dense cuBLAS at large T and are not priced; they stay
callable with ``backend="cuda"``. Neither do symbolic token counts (``torch.compile`` with a dynamic batch):
deciding on T would put a guard on it.

The kernels' shared memory holds the padded token rows of one block's input plus the partial sums; a call whose
largest block does not fit the device's per-block shared memory goes elsewhere (the C++ side makes the same check
exactly and falls back to the tile kernels).
"""
from __future__ import annotations

import functools
import math

import torch

from . import cost_model as cm
from . import cuda_cost  # also registers the ("cuda", "decode") cost estimator
from . import gpu_dispatch

#: most tokens the decode kernels take, per dtype (fp16/bf16: tensor cores, 16 token rows per mma; fp32: CUDA cores)
DECODE_MAX_TOKENS = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 16}


def _token_rows(dtype: torch.dtype, tokens: int) -> int:
    """Token rows the kernel stages in shared memory (whole 16-row mma tiles for 16-bit types, 16 in fp32)."""
    return 16 if dtype == torch.float32 else -(-tokens // 16) * 16


def decode_smem_bytes(dtype: torch.dtype, tokens: int, block: int) -> int:
    """Upper bound of the decode kernels' dynamic shared memory for blocks whose sides are ≤ ``block``:
    the staged input (token rows x padded block width, bank-conflict padding included) plus the largest
    partial-sum buffer (8 warps' fp32 partials: 1152 bytes per token row for the widest warp layout)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    pitch = -(-block // 64) * 64 + 32
    return _token_rows(dtype, tokens) * (pitch * itemsize + 1152)


@functools.lru_cache(maxsize=None)
def _shared_memory_optin(index: int) -> int:
    # every CUDA device since Volta allows more; 48 KiB (the default) where torch does not report it
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 49152)


def shared_memory_optin(device: torch.device) -> int:
    """Per-block shared memory a kernel may opt into on ``device`` (227 KiB on H100, 163 KiB on A100)."""
    return _shared_memory_optin(device.index if device.index is not None else torch.cuda.current_device())


def prefers_cuda(op: str, device: torch.device, dtype: torch.dtype, dims: tuple, training: bool = False) -> bool:
    """``dims = (T, n_in, n_out, block)``, ``block`` the largest block side; ``op`` ``"monarch"`` or ``"blockdiag"``.
    ``training``: autograd records the call, so its backward runs here too; the weight gradients at few tokens
    (decode stages plus the tile kernels) are not priced, so the model never takes ``cuda`` for such a call."""
    tokens, block = dims[0], dims[3]
    limit = DECODE_MAX_TOKENS.get(dtype)
    if device.type != "cuda" or limit is None or not isinstance(tokens, int) or not 1 <= tokens <= limit:
        return False
    if decode_smem_bytes(dtype, tokens, block) > shared_memory_optin(device):
        return False
    from . import backends

    status = backends.available_backends()
    others = [n for n in ("triton",) if status.get(n) == "available" and backends.get(n).supports(device, dtype)]
    if op == "blockdiag":  # priced here: the cost model's block-diagonal prices know Triton and torch only
        if training:  # the block-diagonal weight gradient on this backend is not priced
            return False
        name = gpu_dispatch._DTYPES[dtype]
        _, n_in, n_out, p = dims
        k = math.ceil(n_in / p)
        dev = gpu_dispatch.device()
        mine = cuda_cost.blockdiag_kernel(tokens, k, math.ceil(n_out / k), p, name, dev).time(dev)
        return mine < min(gpu_dispatch.predicted_seconds(o, op, name, tuple(dims)) for o in [*others, "torch"])
    return gpu_dispatch.prefers("cuda", op, dtype, dims, others, training)
