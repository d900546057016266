"""Small models shared by the recipes, built from :mod:`layers` so every one can be Monarch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, monarchify

LAYERS = ("dense", "monarch", "blockdiag")


def linear(in_features: int, out_features: int, layer: str = "dense", nblocks: int = 4, bias: bool = True) -> nn.Module:
    """``nn.Linear``, ``MonarchLinear`` or ``BlockdiagLinear`` of the given size (structured layers fall back
    to dense when a side is smaller than ``nblocks``)."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if layer == "dense" or min(in_features, out_features) < nblocks:
        return nn.Linear(in_features, out_features, bias=bias)
    if layer == "monarch":
        return MonarchLinear(in_features, out_features, bias=bias, nblocks=nblocks)
    return BlockdiagLinear(in_features, out_features, bias=bias, nblocks=nblocks)


class MLP(nn.Module):
    """``in -> hidden (-> hidden)* -> out`` with an activation between layers. Hidden layers use ``layer``;
    the input and output layers are structured too unless ``dense_ends`` (the usual choice for classifiers)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int = 2, layer: str = "monarch",
                 nblocks: int = 4, activation: type = nn.GELU, dense_ends: bool = True, dropout: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dims = [in_features] + [hidden] * depth + [out_features]
        mods = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            end = i == 0 or i == len(dims) - 2
            mods.append(linear(a, b, "dense" if (end and dense_ends) else layer, nblocks))
            if i < len(dims) - 2:
                mods.append(activation())
                if dropout:
                    mods.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)


def tiny_gpt2(vocab_size: int, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 128,
              mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None) -> nn.Module:
    """A randomly initialised Hugging Face ``GPT2LMHeadModel`` at a tiny config; with ``mlp="monarch"`` (or
    ``"blockdiag"``) its MLP ``Conv1D`` layers are replaced through :func:`monarch_kernels.layers.monarchify`."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise ImportError("tiny_gpt2 needs Hugging Face transformers: pip install transformers") from exc
    if seed is not None:
        torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    if mlp != "dense":
        monarchify(model, nblocks=nblocks, include=["**.mlp.c_fc", "**.mlp.c_proj"], layer=mlp, project=False)
    return model
