"""Drop-in ``nn.Module`` layers built on :mod:`monarch_kernels`."""
from .blockdiag_linear import BlockdiagLinear
from .convert import densify, dense_view, from_fly_state_dict, monarchify, to_fly_state_dict
from .monarch_linear import MonarchLinear
from .structured import StructuredLinear

__all__ = [
    "BlockdiagLinear",
    "MonarchLinear",
    "StructuredLinear",
    "dense_view",
    "densify",
    "from_fly_state_dict",
    "monarchify",
    "to_fly_state_dict",
]
