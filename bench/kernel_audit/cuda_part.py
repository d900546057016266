"""CUDA part of the audit: every ``csrc/cuda/*.cu`` compiled for sm_90 with the machine's ``nvcc`` (no GPU
needed), one row per ``__global__`` function (template instance) in the cubin.

Registers, local memory (spills) and static shared memory come from ``cuobjdump --dump-resource-usage``,
tensor-core instructions (``HGMMA``/``HMMA``) and global access widths from the SASS; which parameter each
global access goes through from the PTX (:mod:`.ptx`; CUDA kernels pass pointers inside structs, so the
operand is named by its parameter position and C++ type, e.g. ``p0:Mat2``).

``calls`` counts ``CALL`` instructions in the SASS (64-bit division and other out-of-line helpers end up there);
``weights(ld.cs)`` is the width of the evict-first streaming loads (``__ldcs``), which the decode kernels use for
their weights and nothing else.

Extend here (e.g. extra nvcc flags such as ``-gencode=arch=compute_90a,code=sm_90a`` for wgmma sources, or
per-config template instances): :func:`audit` is registered as the ``cuda`` part in :mod:`bench.kernel_audit`.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

from . import ptx as ptx_mod
from . import sass
from .rows import KernelRow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90"]


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def unavailable() -> str:
    """Why the CUDA part cannot run here ("" when it can)."""
    if shutil.which("nvcc") is None:
        return "nvcc not found"
    if sass.cuobjdump() is None:
        return "cuobjdump not found"
    if not sources():
        return "no csrc/cuda/*.cu sources"
    return ""


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_ptx(ptx: str) -> dict[str, str]:
    """PTX text per ``.entry`` (kernel) name."""
    parts, name, buf = {}, None, []
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:\.visible\s+)?\.entry\s+(\S+?)\(", line)  # internal linkage: no .visible
        if m:
            if name:
                parts[name] = "\n".join(buf)
            name, buf = m.group(1), []
        buf.append(line)
    if name:
        parts[name] = "\n".join(buf)
    return parts


def _sass_per_function(cubin_path: str) -> dict[str, str]:
    text = subprocess.run([sass.cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    parts, name, buf = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                parts[name] = "\n".join(buf)
            name, buf = m.group(1), []
        elif name:
            buf.append(line)
    if name:
        parts[name] = "\n".join(buf)
    return parts


def audit(extra_flags: tuple = (), progress=lambda s: None) -> list[KernelRow]:
    reason = unavailable()
    if reason:
        return [KernelRow("cuda", "-", "-", "-", error=f"skipped: {reason}")]
    rows = []
    for src in sources():
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            # one compilation keeps its own PTX: a second nvcc run would mangle anonymous namespaces differently
            base = ["nvcc", *NVCC_FLAGS, *extra_flags, src, "-cubin", "-o", cubin, "-keep", "-keep-dir", tmp]
            res = subprocess.run(base, capture_output=True, text=True)
            if res.returncode != 0:
                rows.append(KernelRow("cuda", os.path.basename(src), "-", "-", error=res.stderr.strip()[-300:]))
                continue
            data = open(cubin, "rb").read()
            usage = sass.resource_usage(data)
            per_sass = _sass_per_function(cubin)
            per_ptx = {}
            for ptxf in glob.glob(os.path.join(tmp, "*.ptx")):
                per_ptx.update(_split_ptx(open(ptxf).read()))
            pretty = _demangle(list(usage))
            for fn, res_usage in usage.items():
                # "(anonymous namespace)::" would end the name at its parenthesis
                name = re.sub(r"^void ", "", pretty.get(fn, fn).replace("(anonymous namespace)::", ""))
                types = re.search(r"\((.*)\)", name)
                params = [t.strip() for t in types.group(1).split(",")] if types else []
                row = KernelRow("cuda", name.split("(")[0], os.path.basename(src), "",
                                registers=res_usage.get("REG", -1),
                                spill_bytes=max(res_usage.get("STACK", 0), res_usage.get("LOCAL", 0)),
                                shared_bytes=res_usage.get("SHARED", -1))
                tpl = re.search(r"<(.*)>", name.split("(")[0])
                row.dtype = tpl.group(1) if tpl else ""
                code = per_sass.get(fn, "")
                row.tensor_core = "wgmma" if "HGMMA" in code else "mma" if re.search(r"\bHMMA\b", code) else "none"
                row.calls = len(re.findall(r"\bCALL\b", code))
                if fn in per_ptx:
                    streamed = [ptx_mod._access_bytes(op, line) for line in ptx_mod._instructions(per_ptx[fn])
                                for op in [line.split()[0]] if op.startswith("ld.global.cs")]
                    if streamed:  # evict-first streaming loads: the weights of the decode kernels
                        lo, hi = min(streamed), max(streamed)
                        row.loads["weights(ld.cs)"] = str(hi) if lo == hi else f"{lo}-{hi}"
                    summary = ptx_mod.analyse(per_ptx[fn], pointers_only=False)
                    for idx, kinds in summary.widths().items():
                        label = f"p{idx}:{params[idx]}" if idx < len(params) else f"p{idx}"
                        for kind, (lo, hi) in kinds.items():
                            text = "tma" if hi == 0 else (str(hi) if lo == hi else f"{lo}-{hi}")
                            (row.loads if kind == "load" else row.stores)[label] = text
                rows.append(row)
                progress(f"{row.kernel} {row.dtype}")
    return rows
