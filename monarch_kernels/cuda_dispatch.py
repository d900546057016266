"""When ``auto`` takes the compiled CUDA kernels (the ``cuda`` backend) on a GPU.

Only the small-token ("decode") kernels of ``csrc/cuda/decode.cu`` are chosen: with T ≤ 64 tokens (16 in fp32) a
Monarch or block-diagonal product is bound by reading the weights once (2·n²/nblocks elements for Monarch, against
n² for a dense layer) and, at T ≈ 1, by launch latency. Those kernels run both Monarch stages in one cooperative
launch, stream each weight once with 16-byte loads and keep the token rows in shared memory, so their cost is
≈ max(weight bytes / HBM bandwidth, one launch) — the floor for any kernel (predicted per shape by
``monarch_kernels.cuda_cost``; not yet measured on a GPU).

Larger calls never go to ``cuda``: its tile kernels (``csrc/cuda/monarch_kernels.cu``: 64 x 64 WMMA tiles without
``cp.async`` or a pipeline, and a fused Monarch kernel that recomputes stage 1 once per output tile) are predicted
well below the Triton kernels and dense cuBLAS at large T. They stay callable with ``backend="cuda"``.

The kernels' shared memory holds the padded token rows of one block's input plus the partial sums; a call whose
largest block does not fit the device's per-block shared memory goes elsewhere (the C++ side makes the same check
exactly and falls back to the tile kernels).
"""
from __future__ import annotations

import functools

import torch

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


def prefers_cuda(op: str, device: torch.device, dtype: torch.dtype, dims: tuple) -> bool:
    """``dims = (T, n_in, n_out, block)``, ``block`` the largest block side; ``op`` ``"monarch"`` or ``"blockdiag"``."""
    tokens, block = dims[0], dims[3]
    limit = DECODE_MAX_TOKENS.get(dtype)
    if device.type != "cuda" or limit is None or not 1 <= tokens <= limit:
        return False
    return decode_smem_bytes(dtype, tokens, block) <= shared_memory_optin(device)
