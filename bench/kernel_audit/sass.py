"""Resource usage and instruction classes of a cubin, from ``cuobjdump`` (no GPU needed).

``cuobjdump --dump-resource-usage`` gives registers, stack, static shared and local memory per function;
``cuobjdump -sass`` the machine code, from which we count tensor-core instructions (``HGMMA`` = Hopper
warpgroup MMA, ``HMMA`` = the older warp-level MMA), global loads/stores by width (``LDG.E.128`` moves 16 bytes
per thread) and local-memory traffic (``LDL``/``STL``: register spills or a stack array).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=None)
def cuobjdump() -> Optional[str]:
    """Path of a ``cuobjdump`` (triton's bundled copy first, then the CUDA toolkit), or ``None``."""
    try:
        import triton.backends.nvidia as nv

        bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for candidate in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(args: list[str], cubin: bytes) -> str:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither in triton's backends/nvidia/bin nor the CUDA toolkit)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([tool, *args, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``{function: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}``."""
    out, current = {}, None
    for line in _run(["--dump-resource-usage"], cubin).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    return out


_LDST = re.compile(r"\b(LDG|STG|LDL|STL|LDS|STS|LDSM|UTMALDG|UTMASTG)((?:\.[A-Z0-9_:]+)*)")


def _ldst_bytes(mods: str) -> int:
    widths = re.findall(r"\.(128|64|U16|S16|U8|S8|16|8)\b", mods)
    table = {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1, "8": 1}
    return table[widths[-1]] if widths else 4


def sass_summary(cubin: bytes) -> dict:
    """Counts from the SASS: ``hgmma``, ``hmma``, ``ldl``/``stl``, ``tma``, and global loads/stores by bytes."""
    text = _run(["-sass"], cubin)
    counts: Counter = Counter()
    ldg: Counter = Counter()
    stg: Counter = Counter()
    for line in text.splitlines():
        if "HGMMA" in line:
            counts["hgmma"] += 1
        elif re.search(r"\bHMMA\b", line):
            counts["hmma"] += 1
        for op, mods in _LDST.findall(line):
            if op == "LDG":
                ldg[_ldst_bytes(mods)] += 1
            elif op == "STG":
                stg[_ldst_bytes(mods)] += 1
            elif op in ("UTMALDG", "UTMASTG"):
                counts["tma"] += 1
            else:
                counts[op.lower()] += 1
    return {"counts": dict(counts), "ldg_bytes": dict(ldg), "stg_bytes": dict(stg)}
