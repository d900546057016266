"""Hugging Face round trips of monarchified models.

:func:`monarchify` records its conversion in ``model.config.monarch`` (layer paths, kinds, sizes, ``nblocks``,
the patterns used), so ``model.save_pretrained(path)`` writes it to ``config.json`` next to the Monarch factors
(``*.w1``, ``*.w2``) in ``model.safetensors``. A plain ``from_pretrained`` builds the dense architecture and
cannot place those factors; :func:`from_pretrained` here rebuilds the structure first and loads every tensor
exactly::

    from transformers import GPT2LMHeadModel
    from monarch_kernels.layers import monarchify, densify
    from monarch_kernels.layers.hf import from_pretrained

    model = GPT2LMHeadModel.from_pretrained("gpt2")
    monarchify(model, nblocks=4, include="transformer.h.*.mlp.*")
    model.save_pretrained("gpt2-monarch")
    again = from_pretrained(GPT2LMHeadModel, "gpt2-monarch")      # same outputs as `model`

    densify(again)                                                  # back to GPT-2's own Conv1D layers
    again.save_pretrained("gpt2-dense")                             # loads with GPT2LMHeadModel.from_pretrained

Needs ``transformers`` (``pip install monarch-kernels[hf]``).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

from .convert import restructure

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def from_pretrained(
    model_class,
    path: Union[str, os.PathLike],
    *,
    backend: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load a monarchified model saved with ``save_pretrained``: build ``model_class`` from the saved config,
    rebuild the structured layers listed in ``config.monarch`` and load the safetensors weights, requiring every
    key to match (tied parameters, which Hugging Face does not save twice, excepted).

    Args:
        model_class: a Hugging Face model class (``GPT2LMHeadModel``, ``BertModel``, ...) or an ``AutoModel*``
            class.
        path: the folder ``save_pretrained`` wrote (``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``).
        backend: kernel backend of the structured layers (``None``: the process-wide choice).
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: the dtype recorded in the config, else the default dtype).

    Returns:
        The model, in eval mode like ``from_pretrained``.

    Raises:
        ValueError: the folder has no ``monarch`` record (load it with ``model_class.from_pretrained``), no
            safetensors weights, or weights that do not match the rebuilt structure (missing, unexpected or
            differently shaped tensors; the message lists them).
        ImportError: ``transformers`` is not installed.
    """
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ImportError("monarch_kernels.layers.hf needs Hugging Face transformers: "
                          "pip install monarch-kernels[hf] (or pip install transformers)") from exc
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"from_pretrained: {path!r} has no config.json (expected a save_pretrained folder)")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, "monarch", None)
    if not record:
        raise ValueError(f"from_pretrained: {path}/config.json has no 'monarch' record, so it was not saved from a "
                         f"monarchified model; load it with {getattr(model_class, '__name__', model_class)}"
                         ".from_pretrained")
    dtype = dtype or _config_dtype(config)
    build = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
    model = build(config)
    if dtype is not None:
        model.to(dtype)
    restructure(model, record, backend=backend)
    _load_exact(model, _read_safetensors(path), path)
    return model.to(device or "cpu").eval()


def _config_dtype(config) -> Optional[torch.dtype]:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    single, index = os.path.join(path, SAFETENSORS), os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise ValueError(f"from_pretrained: {path} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} "
                     "(save with model.save_pretrained(path), which writes safetensors by default)")


def _load_exact(model: nn.Module, state: dict, path: str) -> None:
    """``load_state_dict`` that allows only tied parameters to be absent and reports every mismatch."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"from_pretrained: the weights in {path} do not fit the structure recorded in its "
                         f"config.monarch: {exc}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise ValueError(f"from_pretrained: the weights in {path} do not match the structure recorded in its "
                         f"config.monarch: missing {untied[:10]}{' ...' if len(untied) > 10 else ''}, unexpected "
                         f"{list(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}")
