"""Module-path pattern semantics: '*' within one segment, '**' across segments, whole-path matches."""
import pytest

from monarch_kernels.layers.patterns import as_patterns, path_matches


@pytest.mark.parametrize("path,pattern,expected", [
    ("encoder.layer.0.output.dense", "encoder.layer.*.output.dense", True),
    ("encoder.layer.0.attention.output.dense", "encoder.layer.*.output.dense", False),  # one segment more
    ("encoder.layer.0.attention.output.dense", "**.output.dense", True),
    ("encoder.layer.0.output.dense", "**.output.dense", True),
    ("output.dense", "**.output.dense", True),  # '**' matches zero segments
    ("encoder.layer.0.output.dense", "*.output.dense", False),  # '*' never crosses a dot
    ("encoder.layer.0.output.dense", "encoder.**", True),
    ("encoder", "encoder.**", True),
    ("decoder.layer", "encoder.**", False),
    ("lm_head", "**", True),
    ("transformer.h.11.mlp.c_fc", "transformer.h.1?.mlp.c_*", True),
    ("transformer.h.1.mlp.c_fc", "transformer.h.1?.mlp.c_*", False),
    ("transformer.h.3.mlp.c_fc", "transformer.h.[0-3].**", True),
    ("a.b.c", "a.**.c", True),
    ("a.c", "a.**.c", True),
    ("a.b.d", "a.**.c", False),
    ("mlp.0", "mlp", False),  # whole path, not a prefix
    ("mlp", "mlp.*", False),
    ("Mlp.0", "mlp.*", False),  # case-sensitive
])
def test_path_matches(path, pattern, expected):
    assert path_matches(path, pattern) is expected


def test_as_patterns_normalises_and_rejects_bad_patterns():
    assert as_patterns(None, "include") == []
    assert as_patterns("a.*", "include") == ["a.*"]
    assert as_patterns(("a", "b.**"), "include") == ["a", "b.**"]
    with pytest.raises(TypeError, match="include must be a module-path pattern"):
        as_patterns(["a", 3], "include")
    with pytest.raises(ValueError, match=r"exclude pattern 'a\*\*b'.*whole segment"):
        as_patterns("a**b", "exclude")
    with pytest.raises(ValueError, match="empty segment"):
        as_patterns("a..b", "include")
