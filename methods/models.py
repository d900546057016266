"""Small models shared by the recipes and the benchmarks, built from :mod:`monarch_kernels.layers` so every one
can be Monarch: :func:`linear`, :class:`MLP`, :class:`ViT`, :func:`tiny_gpt2`."""
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
              mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None,
              backend: Optional[str] = None) -> nn.Module:
    """A randomly initialised Hugging Face ``GPT2LMHeadModel`` at a small config (no dropout); with
    ``mlp="monarch"`` (or ``"blockdiag"``) its MLP ``Conv1D`` layers are replaced through
    :func:`monarch_kernels.layers.monarchify` (``backend``: the structured layers' kernel backend, default auto)."""
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
        monarchify(model, nblocks=nblocks, include=["**.mlp.c_fc", "**.mlp.c_proj"], layer=mlp, project=False,
                   backend=backend)
    return model


class ViTMLP(nn.Module):
    """``fc2(GELU(fc1(x)))``: the transformer feed-forward layer (the layers the Monarch paper makes Monarch)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = ViTMLP(dim, mlp_ratio * dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al.) for ``(B, C, H, W)`` images: non-overlapping
    ``patch×patch`` patches -> linear embedding, a class token, learned positions, ``depth`` pre-norm blocks
    with MLP ``dim -> mlp_ratio·dim -> dim`` (the layers :func:`monarch_kernels.layers.monarchify` replaces,
    ``*.mlp.fc1/fc2``), LayerNorm and a linear head on the class token."""

    def __init__(self, image_size: int = 28, patch: int = 7, channels: int = 1, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: int = 4, num_classes: int = 10):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ViT: image_size {image_size} must be divisible by patch {patch}")
        self.image_size, self.patch, self.channels = image_size, patch, channels
        self.num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    @property
    def tokens(self) -> int:
        return self.num_patches + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s, p = self.channels, self.image_size, self.patch
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"ViT: x must have shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        b, g = x.shape[0], s // p
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], 1) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h)[:, 0])
