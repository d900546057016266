"""``MonarchMLP``: a transformer MLP block of two Monarch layers, ``fc2(act(fc1(x)))``."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from monarch_kernels import monarch_mlp

from .monarch_linear import MonarchLinear


class MonarchMLP(nn.Module):
    """Two :class:`MonarchLinear` layers with an activation between them, ``fc2(act(fc1(x)))`` — the MLP of a
    transformer block (``in -> hidden -> out``), run by :func:`monarch_kernels.monarch_mlp`: the same values as
    ``fc2(fc1(x))`` with ``fc1``'s fused activation, and on the Triton backend the hidden activation never
    reaches memory in the forward (fc1's second stage, the activation and fc2's first stage run as one kernel
    where the shapes allow: 16-bit, e.g. GPT-2's 768 -> 3072 -> 768 with 4 blocks); in eager training the
    backward runs the hidden layer as one kernel too (the pre-activation recomputed, not saved).

    Args:
        in_features, hidden_features: widths of ``x`` and of the hidden activation.
        out_features: output width (default ``in_features``).
        bias: whether both layers have a bias (default ``True``).
        nblocks: blocks per factor of both layers (default 4).
        activation: between the layers, fused into fc1 (default ``"gelu"``; ``"relu"``, ``"gelu_tanh"``,
            ``None``).
        backend, device, dtype: as for :class:`MonarchLinear` (both layers).

    Attributes:
        fc1, fc2: the two :class:`MonarchLinear` layers (``fc1.activation`` is the MLP's activation).

    Example::

        mlp = MonarchMLP(768, 3072, nblocks=4)           # GPT-2's MLP at 0.31x the weights
        y = mlp(torch.randn(8, 128, 768))
        mlp = MonarchMLP.from_layers(MonarchLinear.from_linear(c_fc, 4, activation="gelu"),
                                     MonarchLinear.from_linear(c_proj, 4))
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = True,
                 nblocks: int = 4, *, activation: Optional[str] = "gelu", backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        factory = dict(backend=backend, device=device, dtype=dtype)
        self.fc1 = MonarchLinear(in_features, hidden_features, bias, nblocks, activation=activation, **factory)
        self.fc2 = MonarchLinear(hidden_features, out_features, bias, nblocks, **factory)

    @classmethod
    def from_layers(cls, fc1: MonarchLinear, fc2: MonarchLinear) -> "MonarchMLP":
        """The MLP of two existing layers (shared, not copied): ``fc1`` carries the activation; ``fc2`` has
        none, takes ``fc1``'s output width and runs on the same backend."""
        fn = "MonarchMLP.from_layers"
        if not isinstance(fc1, MonarchLinear) or not isinstance(fc2, MonarchLinear):
            raise TypeError(f"{fn}: fc1 and fc2 must be MonarchLinear layers, got {type(fc1).__name__} and "
                            f"{type(fc2).__name__}")
        if fc2.in_features != fc1.out_features:
            raise ValueError(f"{fn}: fc2.in_features = {fc2.in_features} must equal fc1.out_features = "
                             f"{fc1.out_features}")
        if fc2.activation != "none":
            raise ValueError(f"{fn}: fc2 applies activation {fc2.activation!r}; the MLP's output has none")
        if fc1.backend != fc2.backend:
            raise ValueError(f"{fn}: fc1 and fc2 run on different backends ({fc1.backend!r}, {fc2.backend!r})")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.fc1, mlp.fc2 = fc1, fc2
        return mlp

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)``."""
        if x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"MonarchMLP: input has last dimension {x.shape[-1]}, expected "
                             f"(..., {self.fc1.in_features})")
        x, (w1a, w2a), b1 = self.fc1._op_arguments(x)
        _, (w1b, w2b), b2 = self.fc2._op_arguments(x)
        return monarch_mlp(x, w1a, w2a, w1b, w2b, b1, b2, activation=self.fc1.activation,
                           hidden_features=self.fc1.out_features, out_features=self.fc2.out_features,
                           backend=self.fc1.backend)

    def extra_repr(self) -> str:
        return f"activation={self.fc1.activation!r}"
