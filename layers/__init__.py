"""Drop-in ``nn.Module`` layers built on :mod:`monarch_kernels` (installed as ``monarch_kernels.layers``).

* :class:`MonarchLinear`, :class:`BlockdiagLinear`: ``nn.Linear`` replacements (``from_dense``/``from_linear``
  project a dense weight, ``to_linear``/``to_dense`` go back), optionally with a fused activation;
* :class:`MonarchMLP`: a transformer MLP of two Monarch layers whose hidden activation stays on chip in
  inference (Triton);
* :func:`monarchify` / :func:`densify`: convert a whole model by module-path patterns
  (:mod:`~monarch_kernels.layers.patterns`), optionally fitted to real activations
  (:mod:`~monarch_kernels.layers.calibrate`), then :func:`distill` towards the dense model;
  :func:`fuse_activations` folds ``nn.ReLU``/``nn.GELU`` after them into the kernels' epilogue;
* :func:`from_pretrained` (:mod:`~monarch_kernels.layers.hf`): reload a monarchified Hugging Face model;
* DepthShrinker blocks and merges (:mod:`~monarch_kernels.layers.depthshrinker`).
"""
from .blockdiag_linear import BlockdiagLinear
from .convert import (
    Conversion,
    FusedActivation,
    LayerConversion,
    dense_view,
    densify,
    from_fly_state_dict,
    fuse_activations,
    monarchify,
    restructure,
    to_fly_state_dict,
)
from .distill import distill
from .hf import from_pretrained
from .monarch_linear import MonarchLinear
from .monarch_mlp import MonarchMLP
from .structured import StructuredLinear
from .depthshrinker import (
    BiasMapConv2d,
    PointwiseConv,
    ShrinkableInvertedResidual,
    ShrinkGate,
    compose_convs,
    count_layers,
    depthshrink,
    merge_zero_padded,
    set_removed,
    set_search,
    shrink_blocks,
    topk_keep,
    update_search_flags,
)

__all__ = [
    "BlockdiagLinear",
    "Conversion",
    "FusedActivation",
    "LayerConversion",
    "MonarchLinear",
    "MonarchMLP",
    "StructuredLinear",
    "dense_view",
    "densify",
    "distill",
    "from_fly_state_dict",
    "from_pretrained",
    "fuse_activations",
    "monarchify",
    "restructure",
    "to_fly_state_dict",
    "BiasMapConv2d",
    "PointwiseConv",
    "ShrinkableInvertedResidual",
    "ShrinkGate",
    "compose_convs",
    "count_layers",
    "depthshrink",
    "merge_zero_padded",
    "set_removed",
    "set_search",
    "shrink_blocks",
    "topk_keep",
    "update_search_flags",
]
