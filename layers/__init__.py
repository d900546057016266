"""Drop-in ``nn.Module`` layers built on :mod:`monarch_kernels`."""
from .blockdiag_linear import BlockdiagLinear
from .convert import densify, dense_view, from_fly_state_dict, monarchify, to_fly_state_dict
from .monarch_linear import MonarchLinear
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
    "MonarchLinear",
    "StructuredLinear",
    "dense_view",
    "densify",
    "from_fly_state_dict",
    "monarchify",
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
