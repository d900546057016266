"""Every public class, method and function of the conversion layers documents each of its arguments."""
import importlib
import inspect

import pytest

MODULES = ["convert", "calibrate", "distill", "hf", "patterns", "monarch_linear", "monarch_mlp", "blockdiag_linear",
           "structured"]


def _public(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__ or not callable(obj):
            continue
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, classmethod)):
                    yield f"{name}.{attr}", getattr(obj, attr)


@pytest.mark.parametrize("module_name", MODULES)
def test_public_api_documents_every_argument(module_name):
    module = importlib.import_module(f"monarch_kernels.layers.{module_name}")
    assert module.__doc__
    checked = 0
    for name, obj in _public(module):
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{module_name}.{name} has no docstring"
        sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
        missing = [p for p in sig.parameters if p not in ("self", "cls") and p not in doc]
        assert not missing, f"{module_name}.{name}: arguments {missing} are not documented"
        checked += 1
    assert checked


def test_help_of_monarch_linear_lists_its_arguments():
    from monarch_kernels.layers import MonarchLinear

    text = inspect.getdoc(MonarchLinear)
    assert "Args:" in text
    for arg in ("in_features", "out_features", "bias", "nblocks", "backend", "device", "dtype"):
        assert f"    {arg}:" in text, arg
