"""Module-path patterns: which submodules of a model a conversion selects.

A module path is the dotted name that ``nn.Module.named_modules()`` gives (``encoder.layer.0.output.dense``);
a pattern is matched against the *whole* path, one dot-separated segment at a time:

* ``*`` matches any run of characters within one segment (never a dot), ``?`` one character, ``[abc]`` one
  of a set (as in :mod:`fnmatch`, applied per segment);
* a segment that is exactly ``**`` matches zero or more whole segments.

So ``encoder.layer.*.output.dense`` selects the feed-forward output of every BERT layer but not the attention
output (``encoder.layer.0.attention.output.dense`` has one more segment); ``**.output.dense`` selects both;
``**`` selects everything. A pattern without wildcard characters *names* a module: conversions treat named
modules as an explicit request (they are converted even where a wildcard match would be skipped as unsafe).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Union

Patterns = Union[str, Iterable[str], None]


def as_patterns(patterns: Patterns, argument: str) -> list[str]:
    """Normalise ``None`` / one pattern / an iterable of patterns into a list; ``argument`` names the caller's
    argument in error messages. Raises ``TypeError`` for non-string entries and ``ValueError`` for a ``**``
    that is not a whole segment or an empty segment."""
    if patterns is None:
        return []
    out = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{argument} must be a module-path pattern string or a list of them, got {patterns!r}")
        for segment in p.split("."):
            if not segment:
                raise ValueError(f"{argument} pattern {p!r} has an empty segment (two dots, or a leading/trailing dot)")
            if "**" in segment and segment != "**":
                raise ValueError(f"{argument} pattern {p!r}: '**' must be a whole segment (write 'a.**.b', not 'a**b')")
    return out


def path_matches(path: str, pattern: str) -> bool:
    """Whether the module path ``path`` matches ``pattern`` (semantics in the module docstring)."""
    return _match(path.split(".") if path else [], pattern.split("."))


def _match(names: list[str], pats: list[str]) -> bool:
    if not pats:
        return not names
    head, rest = pats[0], pats[1:]
    if head == "**":
        return any(_match(names[i:], rest) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], head) and _match(names[1:], rest)
