"""The anchor baseline, written here from fly's published algorithm (HazyResearch/fly
``BlockdiagButterflyMultiply``): two strided ``bmm`` calls, two permutation copies, and the stage-1
intermediate saved for backward. Used only by the benchmarks, to compare time and saved-activation memory
with this library's ops under identical conditions.
"""
from __future__ import annotations

import torch


class FlyStyleMonarch(torch.autograd.Function):
    """``out = P2 · BD(w2) · P1 · BD(w1) · x`` for ``x (T, k·p)``; saves ``x`` and the permuted intermediate."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        T = x.shape[0]
        k, q, p = w1.shape
        l, s, r = w2.shape
        out1 = torch.empty(T, k, q, device=x.device, dtype=x.dtype).transpose(0, 1)
        out1 = torch.bmm(x.reshape(T, k, p).transpose(0, 1), w1.transpose(-1, -2), out=out1)
        out1 = out1.transpose(0, 1).reshape(T, r, l).transpose(-1, -2).contiguous().transpose(0, 1)  # copy #1
        out2 = torch.empty(T, l, s, device=x.device, dtype=x.dtype).transpose(0, 1)
        out2 = torch.bmm(out1, w2.transpose(-1, -2), out=out2)
        out2 = out2.permute(1, 2, 0).reshape(T, s * l)  # copy #2
        ctx.save_for_backward(x, w1, w2, out1)
        return out2

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, out1 = ctx.saved_tensors
        T = x.shape[0]
        k, q, p = w1.shape
        l, s, r = w2.shape
        dout = dout.reshape(T, s, l).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, T, s)
        dw2 = torch.bmm(dout.transpose(-1, -2), out1)
        dout1 = torch.bmm(dout, w2).transpose(0, 1).reshape(T, l, r).transpose(-1, -2).contiguous()
        dout1 = dout1.reshape(T, k, q).transpose(0, 1)
        dx = torch.bmm(dout1, w1).transpose(0, 1).reshape(T, k * p)
        dw1 = torch.bmm(dout1.transpose(-1, -2), x.reshape(T, k, p).transpose(0, 1))
        return dx, dw1, dw2


def fly_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    return FlyStyleMonarch.apply(x.reshape(-1, x.shape[-1]), w1, w2).reshape(*lead, -1)
