"""Helpers shared by the Triton host code: interpreter detection, allocation, device description, launch options."""
from __future__ import annotations

import functools
import os

import torch

from ..activations import CODES as ACT_CODES  # noqa: F401  (re-exported for the kernels' hosts)
from .plan import DeviceInfo, Tile


def empty(*shape, device, dtype) -> torch.Tensor:
    """Output/partial buffer allocation (one place, so tests can poison every buffer a kernel must fill)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def empty_token_major(tokens: int, n: int, *, device, dtype) -> torch.Tensor:
    """A ``(tokens, n)`` buffer stored transposed (token stride 1; column stride ``tokens`` rounded up to 16
    elements so every column starts 16-byte aligned): the layout of the intermediates that one kernel writes
    through a Monarch permutation and the next reads (``dy``, ``z``). Every column access is then a run of
    the row tile's tokens, coalesced whatever the column order (:func:`.plan.layout`)."""
    ld = -(-max(tokens, 1) // 16) * 16
    t = empty(n, ld, device=device, dtype=dtype).t()
    return t if ld == tokens else t[:tokens]


@functools.lru_cache(maxsize=None)
def unused_f32(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor per device: the pointer a kernel is given for an fp32 output that a runtime
    flag tells it not to write (the compiled kernel's signature stays the same either way; no allocation per
    call)."""
    return torch.empty(1, device=device, dtype=torch.float32)


def touch_rows(t: torch.Tensor) -> int:
    """Rows of a 2-D ``t (T, n)`` that a kernel may load and store: ``T``, or ``T`` rounded up to 16 for a
    token-major tensor laid out as :func:`empty_token_major` lays it out (column stride exactly that, its storage
    holding the last column's padding).

    A token-major tile's row mask runs along the contiguous axis. Bounded by a multiple of 16, the compiler
    proves it constant over 16 rows and moves 16-byte vectors; bounded by a ``T`` that is not a multiple of 16
    (Triton specialises integers on divisibility by 16 only) it proves nothing, and every access of the tile is
    one 2-byte element (``bench/RESULTS.md`` §7h). The padding rows lie outside every view this package takes
    of such a buffer, and the token-major tensors kernels write are always its own buffers, so a kernel may read
    and write them, provided that nothing it computes from them reaches a real row: row-wise results land in
    padding rows or are masked off, and column sums select the real rows (the weight gradients' sums over
    tokens never read them: a split's ragged last step is masked by ``T`` itself)."""
    T = t.shape[0]
    if not T % 16:
        return T
    pad, (width, ld) = T + 16 - T % 16, t.shape[1:] + t.stride()[1:]  # t is 2-D
    if ld != pad or t.stride(0) != 1 or width < 2:
        return T
    end = (t.storage_offset() + width * pad) * t.element_size()
    return pad if end <= t.untyped_storage().nbytes() else T


def is_token_major(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor is stored token-major (transposed): token stride 1 over several columns."""
    return t.dim() == 2 and token_major_layout(t.shape[1], t.stride())


def token_major_layout(width: int, strides: tuple) -> bool:
    """:func:`is_token_major` of a 2-D tensor with ``width`` columns and ``strides``."""
    return width > 1 and strides[0] == 1


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before import: Triton reads it
    when the kernels are defined, so it is read once here too — an environment lookup on every launch was a
    measurable part of a call's host time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (tf32 would cost ~3e-4 relative
    error), native tensor-core precision for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_info(device: torch.device) -> DeviceInfo:
    """SM count and L2 size the launch plans size themselves for (the CUDA device's own, read once per device; a
    nominal 4-SM device in the interpreter, so that split reductions still have several splits)."""
    if device.type != "cuda":
        return _INTERPRETER_DEVICE
    return _cuda_device_info(torch.cuda.current_device() if device.index is None else device.index)


_INTERPRETER_DEVICE = DeviceInfo(num_sms=4, l2_bytes=DeviceInfo.l2_bytes)


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(num_sms=props.multi_processor_count,
                      l2_bytes=getattr(props, "L2_cache_size", DeviceInfo.l2_bytes))


@functools.lru_cache(maxsize=1024)
def _launch_meta(tile: Tile, names: tuple) -> dict:
    meta = {k: v for k, v in tile.meta().items() if k in names or k.startswith("num_")}
    if interpreting():
        meta.pop("num_stages")
    return meta


def launch_meta(tile: Tile, names=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP")) -> dict:
    """Compile-time arguments ``names`` of ``tile`` plus warps and pipeline stages (the interpreter takes no
    pipelining option); a fresh dict (computed once per tile)."""
    return dict(_launch_meta(tile, tuple(names)))
