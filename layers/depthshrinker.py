"""DepthShrinker (Fu et al., ICML 2022): shrinkable inverted-residual blocks and their exact merge into one conv.

An inverted residual block (MobileNetV2) computes ::

    y = BN3(PW2( σ(BN2(DW_{k×k, s}( σ(BN1(PW1(x))) ))) )) (+ x)

With the activation σ removed (both sites share one switch, as in the official ``InvertedResidual_Share_Act``)
the block is affine, and in eval mode it equals ONE dense ``Conv2d(C_in, C_out, k, stride=s, padding=k//2)``.
With ``a_i = γ_i/√(var_i+ε)`` and ``c_i = β_i − a_i μ_i`` (BN folded) and ``W1 (t·C_in, C_in)``, ``Wdw (t·C_in, k, k)``,
``W2 (C_out, t·C_in)``::

    K[o,i,u,v] = a3_o Σ_m W2[o,m] · a2_m Wdw[m,u,v] · a1_m W1[m,i]      (+1 at o == i, (u,v) = centre: the residual)
    b[o]       = a3_o Σ_m W2[o,m] (a2_m (c1_m Σ_uv Wdw[m,u,v] + bdw_m) + c2_m) + c3_o     (conv biases fold alike)

Border pitfall: an ordinary DW conv zero-pads ``BN1(PW1(x))``; the merged conv zero-pads
``x``, which in the chain becomes ``c1 ≠ 0``. The two differ on the border ring. :class:`ShrinkableInvertedResidual`
therefore uses *pad-first* by default: it pads the block input by ``k//2`` and runs the DW conv unpadded
(LayerMerge's ``adjust_padding``), so :meth:`~ShrinkableInvertedResidual.merge` is exact everywhere. Blocks trained
with ordinary zero padding (``padding="zeros"``) are converted exactly, for one fixed input size, by
:func:`merge_zero_padded` (dense conv + position-dependent bias map).

Pointwise layers can be ``MonarchLinear`` applied to the channel dim (a 1×1 conv is a linear map over channels);
the merge materialises them to dense (the merged taps ``diag(a3) M2 diag(a2 ∘ w_uv) M1 diag(a1)`` are not Monarch).

Search (official ``learnable_relu6_hard``): each block's :class:`ShrinkGate` has a 0-d score ``s`` (init 0). With
``c = clamp(s, 0, 1)`` and ``sg`` = stop-gradient, the forward value is hard and the gradient reaches ``s``::

    keep:   y = σ(x) + (x − σ(x)) · (c − sg(c))        (value σ(x))
    remove: y = σ(x) + (x − σ(x)) · (1 + c − sg(c))    (value x)

so ``∂y/∂s = x − σ(x)`` on ``0 ≤ s ≤ 1``. Before every step :func:`update_search_flags` keeps the
``⌊keep_ratio · N⌋`` gates with the SMALLEST scores and removes the rest (large score = the loss wants it linear).

Relaxed search (this library's alternative, same gradient): the gate's value is the score itself,
``y = σ(x) + c·(x − σ(x))`` (mode ``"relax"``, a leaky ReLU6 with learned slope ``c``), and after every step
:func:`project_scores` projects the scores onto ``{s ∈ [0, 1]^N : Σ s = R}`` with ``R = N − ⌊keep_ratio · N⌋``, the
convex hull of the masks that remove exactly ``R`` activations. The budget is the sparsity constraint of the hard
top-k made continuous: the total linearity is fixed, so a score rises only by taking linearity from a block whose
task gradient resists it more, and the network adapts to each intermediate slope instead of to a mask that flips
whenever two nearly equal scores cross. The mask is the top-k of the final scores (:func:`topk_keep`).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .monarch_linear import MonarchLinear

GATE_MODES = ("keep", "remove", "search", "relax")
POINTWISE_KINDS = ("dense", "monarch")
PADDING_MODES = ("pad_first", "zeros")


# ------------------------------------------------------------------------------------------------ the gate
class ShrinkGate(nn.Module):
    """A removable activation with a learnable removal score (one per block, used at both activation sites).

    ``mode``:

    * ``"keep"``: ``σ(x)``;
    * ``"remove"``: ``σ(x) + slope·(x − σ(x))`` — ``slope = 1`` is the identity and the only mergeable value,
      smaller slopes give the official ``DECAY_SLOPE`` leaky ReLU6 ramp;
    * ``"search"``: the paper's hard straight-through gate (module docstring); the keep/remove decision is the
      ``removed`` buffer, set by :func:`update_search_flags`;
    * ``"relax"``: the same gate with its hard value replaced by the score itself,
      ``σ(x) + clamp(s, 0, 1)·(x − σ(x))`` — a leaky ReLU6 whose slope is learned (see :func:`project_scores`).
      Its gradient is the hard gate's, ``∂y/∂s = x − σ(x)`` on ``0 ≤ s ≤ 1``.

    ``mode`` and ``slope`` are saved in the state dict as the tensors ``mode_code`` (index into
    :data:`GATE_MODES`) and ``slope_value``, so any tensor-only format (safetensors) can hold a network of gates.
    """

    def __init__(self, activation: Optional[nn.Module] = None, mode: str = "keep"):
        super().__init__()
        if activation is not None and not isinstance(activation, nn.Module):
            raise TypeError(f"ShrinkGate: activation must be an nn.Module, got {type(activation).__name__}")
        self.act = activation if activation is not None else nn.ReLU6()
        self.score = nn.Parameter(torch.zeros(()))
        self.register_buffer("removed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mode_code", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("slope_value", torch.ones((), dtype=torch.float64))
        self.slope = 1.0
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in GATE_MODES:
            raise ValueError(f"ShrinkGate: mode must be one of {GATE_MODES}, got {value!r}")
        self._mode = value
        self.mode_code.fill_(GATE_MODES.index(value))

    @property
    def slope(self) -> float:
        return self._slope

    @slope.setter
    def slope(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"ShrinkGate: slope must be a number in [0, 1], got {value!r}")
        self._slope = float(value)
        self.slope_value.fill_(self._slope)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        code = int(self.mode_code)
        if not 0 <= code < len(GATE_MODES):
            raise ValueError(f"ShrinkGate: {prefix}mode_code must index {GATE_MODES}, got {code}")
        self.mode = GATE_MODES[code]
        self.slope = float(self.slope_value)

    @property
    def removes(self) -> bool:
        """True when the activation is (currently) removed: mode ``"remove"``, or ``"search"`` with the flag set."""
        return self._mode == "remove" or (self._mode == "search" and bool(self.removed))

    @property
    def is_linear(self) -> bool:
        """True when the gate is exactly the identity (mergeable)."""
        return self._mode == "remove" and self._slope == 1.0

    def linearity(self) -> Tensor:
        """The relaxed gate's slope ``clamp(s, 0, 1)`` (0 = activation kept, 1 = removed), differentiable in ``s``."""
        return self.score.clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "keep":
            return self.act(x)
        if self._mode == "remove":
            if self._slope == 1.0:
                return x
            s = self.act(x)
            return s + self._slope * (x - s)
        s = self.act(x)
        c = self.linearity().to(x.dtype)
        if self._mode == "relax":
            return s + (x - s) * c
        return s + (x - s) * (self.removed.to(x.dtype) + (c - c.detach()))

    def extra_repr(self) -> str:
        slope = f", slope={self._slope}" if self._mode == "remove" and self._slope != 1 else ""
        return f"mode={self._mode!r}" + slope


# ------------------------------------------------------------------------------------------------ pointwise
class PointwiseConv(nn.Module):
    """A 1×1 convolution, i.e. a linear map over the channel dim of ``(N, C, H, W)``: ``nn.Conv2d`` (``"dense"``)
    or :class:`~monarch_kernels.layers.MonarchLinear` applied to the channels (``"monarch"``, via an NHWC view)."""

    def __init__(self, in_channels: int, out_channels: int, kind: str = "dense", nblocks: int = 4, bias: bool = False):
        super().__init__()
        if kind not in POINTWISE_KINDS:
            raise ValueError(f"PointwiseConv: kind must be one of {POINTWISE_KINDS}, got {kind!r}")
        self.in_channels, self.out_channels, self.kind = in_channels, out_channels, kind
        if kind == "dense":
            self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        else:
            self.linear = MonarchLinear(in_channels, out_channels, bias=bias, nblocks=nblocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "dense":
            return self.conv(x)
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def weight_matrix(self) -> Tensor:
        """The dense ``(out_channels, in_channels)`` matrix."""
        if self.kind == "dense":
            return self.conv.weight[:, :, 0, 0]
        return self.linear.dense_weight()

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv.bias if self.kind == "dense" else self.linear.bias


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``a·x + c``: ``a = γ/√(var+ε)``, ``c = β − a·μ`` (float64)."""
    if bn.running_mean is None:
        raise ValueError("merge: BatchNorm2d without running statistics (track_running_stats=False) cannot be folded")
    var = bn.running_var.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    c = -a * bn.running_mean.double()
    if bn.bias is not None:
        c = c + bn.bias.double()
    return a, c


def _check_positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


# ------------------------------------------------------------------------------------------------ the block
class ShrinkableInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block whose activation can be kept, removed or searched, and merged.

    ``PW1 (C_in → t·C_in) → BN1 → σ → DW (k×k, stride s) → BN2 → σ → PW2 (t·C_in → C_out) → BN3 (+ x)``.
    ``expand_ratio = 1`` drops PW1/BN1/σ (MobileNetV2's first block). The residual is used when ``stride == 1``
    and ``C_in == C_out`` (``residual=None``) or forced off with ``residual=False``.

    Args:
        padding: ``"pad_first"`` (default; pad the block input by ``k//2``, DW conv unpadded — mergeable exactly)
            or ``"zeros"`` (ordinary DW zero padding; convert with :func:`merge_zero_padded`).
        pointwise: ``"dense"`` (``nn.Conv2d`` 1×1) or ``"monarch"`` (``MonarchLinear`` over channels, ``nblocks``).
        final_act: append ``final_act`` (e.g. ``nn.ReLU6()``) after the sum while the activation is removed (also
            during the search when the block's flag says removed, so the search sees the network it will
            fine-tune; the official ``ADD_FINAL_ACT``); it stays outside the merged conv. With a ``"relax"`` gate
            of slope ``α`` the output is ``h + α·(final_act(h) − h)``, the same interpolation as the gate.
    Input ``(N, C_in, H, W)``; output ``(N, C_out, ⌊(H−1)/s⌋+1, ⌊(W−1)/s⌋+1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expand_ratio: float = 6,
        kernel_size: int = 3,
        *,
        pointwise: str = "dense",
        nblocks: int = 4,
        activation: Optional[nn.Module] = None,
        padding: str = "pad_first",
        residual: Optional[bool] = None,
        final_act: Optional[nn.Module] = None,
    ):
        super().__init__()
        name = type(self).__name__
        _check_positive_int(name, "in_channels", in_channels)
        _check_positive_int(name, "out_channels", out_channels)
        if stride not in (1, 2):
            raise ValueError(f"{name}: stride must be 1 or 2, got {stride!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be a positive odd int, got {kernel_size!r}")
        if not isinstance(expand_ratio, (int, float)) or expand_ratio < 1:
            raise ValueError(f"{name}: expand_ratio must be a number >= 1, got {expand_ratio!r}")
        if padding not in PADDING_MODES:
            raise ValueError(f"{name}: padding must be one of {PADDING_MODES}, got {padding!r}")
        can_residual = stride == 1 and in_channels == out_channels
        if residual is None:
            residual = can_residual
        elif residual and not can_residual:
            raise ValueError(f"{name}: residual=True needs stride 1 and in_channels == out_channels, got "
                             f"stride={stride}, {in_channels} -> {out_channels}")
        if final_act is not None and not isinstance(final_act, nn.Module):
            raise TypeError(f"{name}: final_act must be an nn.Module or None, got {type(final_act).__name__}")
        hidden = int(round(in_channels * expand_ratio))
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden
        self.stride, self.kernel_size, self.padding_mode = stride, kernel_size, padding
        self.expand_ratio, self.use_residual = expand_ratio, bool(residual)
        self.gate = ShrinkGate(activation)
        if expand_ratio != 1:
            self.pw1 = PointwiseConv(in_channels, hidden, pointwise, nblocks)
            self.bn1 = nn.BatchNorm2d(hidden)
        else:
            self.pw1 = self.bn1 = None
        pad = kernel_size // 2
        self.dw = nn.Conv2d(hidden, hidden, kernel_size, stride, padding=0 if padding == "pad_first" else pad,
                            groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.pw2 = PointwiseConv(hidden, out_channels, pointwise, nblocks)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.final_act = final_act

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input must be (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        h = x
        if self.padding_mode == "pad_first":
            p = self.kernel_size // 2
            h = F.pad(h, (p, p, p, p))
        if self.pw1 is not None:
            h = self.gate(self.bn1(self.pw1(h)))
        h = self.gate(self.bn2(self.dw(h)))
        h = self.bn3(self.pw2(h))
        if self.use_residual:
            h = h + x
        if self.final_act is not None:
            if self.gate.mode == "relax":  # blend along with the gate: kept block at 0, removed block at 1
                h = h + self.gate.linearity().to(h.dtype) * (self.final_act(h) - h)
            elif self.gate.removes:
                h = self.final_act(h)
        return h

    # -- merge -------------------------------------------------------------------------------------
    def _check_mergeable(self, fn: str) -> None:
        if not self.gate.is_linear:
            raise ValueError(f"{type(self).__name__}.{fn}: the activation must be removed first "
                             f"(gate.mode='remove', slope=1), got mode={self.gate.mode!r}, slope={self.gate.slope}")

    def _chain(self):
        """The affine chain as float64 pieces: ``A1 (m,i), B1 (m,)`` for BN1∘PW1 (identity without expansion),
        ``D (m,k,k)`` the BN2-scaled DW taps, ``E (m,)`` the DW bias after BN2, ``A3 (o,m)``, ``B3 (o,)``."""
        dd = torch.float64
        dev = self.dw.weight.device
        if self.pw1 is not None:
            a1, c1 = _bn_affine(self.bn1)
            A1 = a1[:, None] * self.pw1.weight_matrix().double()
            b_pw1 = self.pw1.bias
            B1 = c1 + (a1 * b_pw1.double() if b_pw1 is not None else 0.0)
        else:
            A1 = torch.eye(self.in_channels, dtype=dd, device=dev)
            B1 = torch.zeros(self.in_channels, dtype=dd, device=dev)
        a2, c2 = _bn_affine(self.bn2)
        wdw = self.dw.weight[:, 0].double()
        D = a2[:, None, None] * wdw
        E = c2 + (a2 * self.dw.bias.double() if self.dw.bias is not None else 0.0)
        a3, c3 = _bn_affine(self.bn3)
        A3 = a3[:, None] * self.pw2.weight_matrix().double()
        b_pw2 = self.pw2.bias
        B3 = c3 + (a3 * b_pw2.double() if b_pw2 is not None else 0.0)
        return A1, B1, D, E, A3, B3

    def _merged_kernel(self, A1, D, A3) -> Tensor:
        K = torch.einsum("om,muv,mi->oiuv", A3, D, A1)
        if self.use_residual:
            c = self.kernel_size // 2
            idx = torch.arange(self.in_channels, device=K.device)
            K[idx, idx, c, c] += 1.0
        return K

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """The one dense ``Conv2d(C_in, C_out, k, stride=s, padding=k//2, bias=True)`` equal to this block in eval
        mode (BN running statistics folded, residual at the kernel centre), computed in float64 and cast to the
        block's dtype. Needs the activation removed; ``final_act`` is not included (see :func:`depthshrink`).
        Blocks with ``padding="zeros"`` and an expansion layer are only exact with :func:`merge_zero_padded`."""
        self._check_mergeable("merge")
        if self.padding_mode == "zeros" and self.pw1 is not None:
            raise ValueError(f"{type(self).__name__}.merge: a block with padding='zeros' zero-pads BN1's output, "
                             "so a plain merge is wrong on the border ring; use merge_zero_padded(block, "
                             "input_size) (exact for one input size) or train with padding='pad_first'")
        A1, B1, D, E, A3, B3 = self._chain()
        K = self._merged_kernel(A1, D, A3)
        bias = A3 @ (D.sum((1, 2)) * B1 + E) + B3
        w = self.dw.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         padding=self.kernel_size // 2, bias=True, device=w.device, dtype=w.dtype)
        conv.weight.copy_(K)
        conv.bias.copy_(bias)
        return conv

    def merged_param_count(self) -> int:
        return self.in_channels * self.out_channels * self.kernel_size ** 2 + self.out_channels

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, t={self.expand_ratio}, k={self.kernel_size}, "
                f"stride={self.stride}, residual={self.use_residual}, padding={self.padding_mode!r}")


# ------------------------------------------------------------------------------------------------ a network
#: ``(expand ratio t, output channels c, stride s, kernel k)`` per block: MobileNetV2's pattern at toy width
MBV2_MINI_BLOCKS = (
    (1, 12, 1, 3),
    (3, 16, 2, 3),
    (3, 16, 1, 3),
    (3, 24, 1, 5),
    (3, 24, 1, 3),
    (3, 32, 2, 3),
    (3, 32, 1, 3),
    (3, 32, 1, 3),
)


class MobileNetV2Mini(nn.Module):
    """A small MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018)
    made of :class:`ShrinkableInvertedResidual` blocks::

        stem 3×3 (→ stem_channels, stride stem_stride) → BN → ReLU6 → blocks → 1×1 head → BN → ReLU6 → GAP → Linear

    ``blocks``: ``(t, c, s, k)`` per block (default :data:`MBV2_MINI_BLOCKS`). ``pointwise="monarch"`` makes the
    blocks' 1×1 convs ``MonarchLinear`` over channels with ``nblocks`` blocks. ``final_act``: ReLU6 after the sum of
    a block whose activation is removed (official ``ADD_FINAL_ACT``). Input ``(N, in_channels, H, W)``, output
    logits ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: Sequence = MBV2_MINI_BLOCKS,
                 stem_channels: int = 12, stem_stride: int = 2, head_channels: int = 64, pointwise: str = "dense",
                 nblocks: int = 4, final_act: bool = True):
        super().__init__()
        name = type(self).__name__
        for arg, v in (("in_channels", in_channels), ("num_classes", num_classes), ("stem_channels", stem_channels),
                       ("head_channels", head_channels)):
            _check_positive_int(name, arg, v)
        if stem_stride not in (1, 2):
            raise ValueError(f"{name}: stem_stride must be 1 or 2, got {stem_stride!r}")
        if not blocks or any(not isinstance(b, (tuple, list)) or len(b) != 4 for b in blocks):
            raise ValueError(f"{name}: blocks must be a non-empty sequence of (t, c, s, k), got {blocks!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU6())
        layers, c_in = [], stem_channels
        for t, c, s, k in blocks:
            layers.append(ShrinkableInvertedResidual(c_in, c, s, t, k, pointwise=pointwise, nblocks=nblocks,
                                                     final_act=nn.ReLU6() if final_act else None))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(c_in, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels),
                                  nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(head_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


# ------------------------------------------------------------------------------------------------ zero padding
class BiasMapConv2d(nn.Module):
    """``conv(x) + bias_map``: a bias-free ``Conv2d`` plus a position-dependent bias ``(C_out, H_out, W_out)``,
    valid for one input size ``input_size = (H, W)`` only."""

    def __init__(self, conv: nn.Conv2d, bias_map: Tensor, input_size: tuple[int, int]):
        super().__init__()
        self.conv = conv
        self.input_size = tuple(input_size)
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"BiasMapConv2d: built for inputs (N, C, {self.input_size[0]}, {self.input_size[1]}), "
                             f"got {tuple(x.shape)}")
        return self.conv(x) + self.bias_map

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, bias_map={tuple(self.bias_map.shape)}"


@torch.no_grad()
def merge_zero_padded(block: ShrinkableInvertedResidual, input_size: Sequence[int]) -> BiasMapConv2d:
    """Exact merge of a block whose DW conv zero-pads ``BN1(PW1(x))`` (ordinary padding), for inputs of size
    ``input_size = (H, W)``.

    The block is affine, ``f(x) = L(x) + f(0)``. Its linear part ``L`` zero-pads ``x`` (PW1 of 0 is 0), so
    ``L`` is the merged kernel ``K`` with zero padding ``k//2`` and no bias. The offset ``f(0)`` is the chain run on
    the constant image ``B1 = a1·b_pw1 + c1`` with the DW zero padding: equal to the merged bias in the interior and
    different on the border ring (the DW tap sums there see zeros instead of ``c1``). Also works for
    ``padding="pad_first"`` blocks (then the map is constant)."""
    if not isinstance(block, ShrinkableInvertedResidual):
        raise TypeError(f"merge_zero_padded: block must be a ShrinkableInvertedResidual, got {type(block).__name__}")
    block._check_mergeable("merge_zero_padded")
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(v, int) and v >= 1 for v in input_size)):
        raise ValueError(f"merge_zero_padded: input_size must be (H, W) positive ints, got {input_size!r}")
    H, W = input_size
    A1, B1, D, E, A3, B3 = block._chain()
    K = block._merged_kernel(A1, D, A3)
    k, s, p = block.kernel_size, block.stride, block.kernel_size // 2
    m = D.shape[0]
    if block.padding_mode == "pad_first":  # the ring holds PW1(0) through BN1 = B1, like the interior
        h = F.conv2d(B1[None, :, None, None].expand(1, m, H + 2 * p, W + 2 * p), D[:, None], stride=s, groups=m)
    else:  # the DW conv zero-pads its input: zeros on the ring, B1 inside
        h = F.conv2d(B1[None, :, None, None].expand(1, m, H, W), D[:, None], stride=s, padding=p, groups=m)
    h = h[0] + E[:, None, None]
    bias_map = torch.einsum("om,mhw->ohw", A3, h) + B3[:, None, None]
    w = block.dw.weight
    conv = nn.Conv2d(block.in_channels, block.out_channels, k, s, padding=p, bias=False,
                     device=w.device, dtype=w.dtype)
    conv.weight.copy_(K)
    return BiasMapConv2d(conv, bias_map.to(w.dtype), (H, W))


# ------------------------------------------------------------------------------------------------ chains
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@torch.no_grad()
def compose_convs(conv1: nn.Conv2d, conv2: nn.Conv2d) -> nn.Conv2d:
    """One ``Conv2d`` equal to ``conv2 ∘ conv1`` (no activation between), per spatial dim::

        kernel d = d1 + s1·(d2 − 1),   stride s = s1·s2,   padding p = p1 + s1·p2.

    Exact everywhere when ``conv2`` is unpadded (``p2 = 0``, e.g. PW → DW → PW chains, where the padding sits on
    the chain input). With ``p2 > 0``, ``conv2`` zero-pads ``conv1``'s output while the composed conv sees
    ``conv1`` extended over the padded input (the border pitfall again), so the two agree on every output whose
    window avoids that padding ring (the interior). Grouped convs are expanded to dense; dilation must be 1;
    ``padding_mode`` must be ``"zeros"``."""
    for name, c in (("conv1", conv1), ("conv2", conv2)):
        if not isinstance(c, nn.Conv2d):
            raise TypeError(f"compose_convs: {name} must be an nn.Conv2d, got {type(c).__name__}")
        if _pair(c.dilation) != (1, 1) or c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise ValueError(f"compose_convs: {name} must have dilation 1 and numeric zero padding")
    if conv2.in_channels != conv1.out_channels:
        raise ValueError(f"compose_convs: conv2.in_channels ({conv2.in_channels}) must equal conv1.out_channels "
                         f"({conv1.out_channels})")

    def dense(c: nn.Conv2d) -> Tensor:
        w = c.weight.double()
        if c.groups == 1:
            return w
        og, ig = c.out_channels // c.groups, c.in_channels // c.groups
        full = w.new_zeros(c.out_channels, c.in_channels, *w.shape[-2:])
        for g in range(c.groups):
            full[g * og:(g + 1) * og, g * ig:(g + 1) * ig] = w[g * og:(g + 1) * og]
        return full

    K1, K2 = dense(conv1), dense(conv2)
    (d1h, d1w), (d2h, d2w) = K1.shape[-2:], K2.shape[-2:]
    (s1h, s1w), (s2h, s2w) = _pair(conv1.stride), _pair(conv2.stride)
    (p1h, p1w), (p2h, p2w) = _pair(conv1.padding), _pair(conv2.padding)
    dh, dw_ = d1h + s1h * (d2h - 1), d1w + s1w * (d2w - 1)
    K = K1.new_zeros(conv2.out_channels, conv1.in_channels, dh, dw_)
    for u in range(d2h):
        for v in range(d2w):
            K[:, :, s1h * u:s1h * u + d1h, s1w * v:s1w * v + d1w] += torch.einsum("om,miab->oiab", K2[:, :, u, v], K1)
    b1 = conv1.bias.double() if conv1.bias is not None else K1.new_zeros(conv1.out_channels)
    b = K2.sum((2, 3)) @ b1
    if conv2.bias is not None:
        b = b + conv2.bias.double()
    w = conv1.weight
    out = nn.Conv2d(conv1.in_channels, conv2.out_channels, (dh, dw_), (s1h * s2h, s1w * s2w),
                    padding=(p1h + s1h * p2h, p1w + s1w * p2w), bias=True, device=w.device, dtype=w.dtype)
    out.weight.copy_(K)
    out.bias.copy_(b)
    return out


# ------------------------------------------------------------------------------------------------ model level
def shrink_blocks(model: nn.Module) -> list[ShrinkableInvertedResidual]:
    """The model's shrinkable blocks in module order (the search candidates)."""
    return [m for m in model.modules() if isinstance(m, ShrinkableInvertedResidual)]


def set_removed(model: nn.Module, removed: Sequence[bool]) -> None:
    """Fix every block's gate: ``removed[i]`` True → ``"remove"`` (identity), False → ``"keep"``."""
    blocks = shrink_blocks(model)
    removed = [bool(r) for r in removed]
    if len(removed) != len(blocks):
        raise ValueError(f"set_removed: removed must have one flag per block ({len(blocks)}), got {len(removed)}")
    for b, r in zip(blocks, removed):
        b.gate.mode = "remove" if r else "keep"
        b.gate.slope = 1.0
        b.gate.removed.fill_(r)


def topk_keep(scores: Tensor, keep_ratio: float) -> Tensor:
    """Boolean ``removed`` flags: the ``⌊keep_ratio · N⌋`` smallest scores are kept, the rest removed
    (ties broken by position, earlier kept first)."""
    if not isinstance(keep_ratio, (int, float)) or not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"topk_keep: keep_ratio must be in [0, 1], got {keep_ratio!r}")
    scores = torch.as_tensor(scores).detach().flatten().double().cpu()
    n = scores.numel()
    n_keep = int(math.floor(keep_ratio * n + 1e-9))
    order = torch.sort(scores, stable=True).indices
    removed = torch.ones(n, dtype=torch.bool)
    removed[order[:n_keep]] = False
    return removed


def set_search(model: nn.Module, keep_ratio: float) -> Tensor:
    """Put every gate in ``"search"`` mode and set its flag from the current scores (see :func:`topk_keep`)."""
    for b in shrink_blocks(model):
        b.gate.mode = "search"
    return update_search_flags(model, keep_ratio)


@torch.no_grad()
def update_search_flags(model: nn.Module, keep_ratio: float) -> Tensor:
    """Recompute the hard keep/remove flags from the scores (call before every search step); returns them."""
    gates = [b.gate for b in shrink_blocks(model)]
    if not gates:
        raise ValueError("update_search_flags: the model has no ShrinkableInvertedResidual blocks")
    removed = topk_keep(torch.stack([g.score for g in gates]), keep_ratio)
    for g, r in zip(gates, removed.tolist()):
        g.removed.fill_(r)
    return removed


def gate_scores(model: nn.Module) -> Tensor:
    return torch.stack([b.gate.score.detach() for b in shrink_blocks(model)]).cpu()


def removal_count(n_blocks: int, keep_ratio: float) -> int:
    """How many of ``n_blocks`` activations a ``keep_ratio`` removes: ``N − ⌊keep_ratio · N⌋`` (as
    :func:`topk_keep`)."""
    if not isinstance(keep_ratio, (int, float)) or not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"removal_count: keep_ratio must be in [0, 1], got {keep_ratio!r}")
    return n_blocks - int(math.floor(keep_ratio * n_blocks + 1e-9))


def capped_simplex_projection(v: Tensor, total: float) -> Tensor:
    """Euclidean projection of ``v (N,)`` onto ``{a ∈ [0, 1]^N : Σ a = total}``, the convex hull of the 0/1
    vectors with ``total`` ones (``0 ≤ total ≤ N``): ``a_i = clamp(v_i − τ, 0, 1)`` with the shift ``τ`` found
    by bisection (``Σ_i clamp(v_i − τ, 0, 1)`` is non-increasing in ``τ``). Computed in float64."""
    v = torch.as_tensor(v).detach().flatten().double()
    n = v.numel()
    if not isinstance(total, (int, float)) or not 0 <= total <= n:
        raise ValueError(f"capped_simplex_projection: total must be in [0, {n}], got {total!r}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("capped_simplex_projection: v must be finite")
    lo, hi = float(v.min()) - 1.0, float(v.max())  # Σ = N at lo, 0 at hi
    for _ in range(100):
        tau = 0.5 * (lo + hi)
        if float((v - tau).clamp(0.0, 1.0).sum()) > total:
            lo = tau
        else:
            hi = tau
    return (v - 0.5 * (lo + hi)).clamp(0.0, 1.0)


def set_relaxed(model: nn.Module, keep_ratio: float) -> Tensor:
    """Put every gate in ``"relax"`` mode with the same slope ``n_removed / N`` (the centre of the budget set of
    :func:`project_scores`); returns the scores."""
    gates = [b.gate for b in shrink_blocks(model)]
    if not gates:
        raise ValueError("set_relaxed: the model has no ShrinkableInvertedResidual blocks")
    start = removal_count(len(gates), keep_ratio) / len(gates)
    with torch.no_grad():
        for g in gates:
            g.mode = "relax"
            g.score.fill_(start)
    return gate_scores(model)


@torch.no_grad()
def project_scores(model: nn.Module, keep_ratio: float) -> Tensor:
    """Project the gate scores onto the removal budget ``{s ∈ [0, 1]^N : Σ s = N − ⌊keep_ratio · N⌋}`` in place
    (:func:`capped_simplex_projection`); returns them. Call after every optimizer step of a relaxed search: the
    relaxed gates then always remove exactly the budget's worth of nonlinearity in total, and the task loss
    decides where."""
    gates = [b.gate for b in shrink_blocks(model)]
    if not gates:
        raise ValueError("project_scores: the model has no ShrinkableInvertedResidual blocks")
    scores = torch.stack([g.score.detach() for g in gates])
    projected = capped_simplex_projection(scores, removal_count(len(gates), keep_ratio))
    for g, s in zip(gates, projected):
        g.score.fill_(float(s))
    return projected


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def depthshrink(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every block whose activation is removed by its merged dense ``Conv2d`` (followed by the block's
    ``final_act``, if any) and return the model in eval mode. Blocks that keep their activation are left as
    they are. The result equals the eval-mode input model (see :meth:`ShrinkableInvertedResidual.merge`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"depthshrink: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, ShrinkableInvertedResidual):
        raise ValueError("depthshrink: pass the network; call block.merge() to merge a single block")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, ShrinkableInvertedResidual) and m.gate.is_linear]
    for name, block in targets:
        conv = block.merge()
        _replace(model, name, conv if block.final_act is None else nn.Sequential(conv, block.final_act))
    return model


def count_layers(model: nn.Module) -> dict:
    """Layer counts: ``conv`` (Conv2d, incl. depthwise, plus channel MonarchLinear/Linear pointwise layers),
    ``depthwise``, ``linear`` (classifier-style Linear/MonarchLinear outside PointwiseConv), ``bn``, ``act``
    (activation modules in use; a kept gate counts once although it acts at two sites)."""
    counts = {"conv": 0, "depthwise": 0, "linear": 0, "bn": 0, "act": 0}
    pointwise_linear = {id(m.linear) for m in model.modules() if isinstance(m, PointwiseConv) and m.kind == "monarch"}
    gate_acts = {id(m.act) for m in model.modules() if isinstance(m, ShrinkGate)}
    gate_acts |= {id(m.final_act) for m in model.modules()  # unused final activations of unremoved blocks
                  if isinstance(m, ShrinkableInvertedResidual) and m.final_act is not None and not m.gate.removes}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            counts["conv"] += 1
            counts["depthwise"] += int(m.groups > 1 and m.groups == m.in_channels)
        elif id(m) in pointwise_linear:
            counts["conv"] += 1
        elif isinstance(m, (nn.Linear, MonarchLinear)):
            counts["linear"] += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts["bn"] += 1
        elif isinstance(m, ShrinkGate):
            counts["act"] += int(not m.is_linear)
        elif isinstance(m, (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)) and id(m) not in gate_acts:
            counts["act"] += 1
    return counts


__all__ = [
    "MBV2_MINI_BLOCKS",
    "BiasMapConv2d",
    "MobileNetV2Mini",
    "PointwiseConv",
    "ShrinkGate",
    "ShrinkableInvertedResidual",
    "capped_simplex_projection",
    "compose_convs",
    "count_layers",
    "depthshrink",
    "gate_scores",
    "merge_zero_padded",
    "project_scores",
    "removal_count",
    "set_relaxed",
    "set_removed",
    "set_search",
    "shrink_blocks",
    "topk_keep",
    "update_search_flags",
]
