"""Which kernel argument each global memory access goes through, and how wide it is, read from PTX.

A forward data-flow pass over the PTX: ``ld.param`` of argument ``i`` seeds register taint ``{i}``; every
other instruction passes the union of its source registers' taint to its destinations (loads from memory
pass none: a loaded value is data, not an address); iterate to a fixed point (loops reuse registers). The
address register of each ``ld.global`` / ``st.global`` / ``cp.async`` then names the pointer argument(s) it
was computed from, and the instruction's vector shape gives the bytes moved per thread per instruction
(``.v4.b32`` = 16 bytes; ``cp.async ..., 16`` = 16 bytes; a bulk tensor copy is reported as ``tma``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

_PARAM_DECL = re.compile(r"\.param\b([^,;\n]*?)\b(\w+_param_(\d+))")
_REG = re.compile(r"%[a-z]+\d*")
_LD_PARAM = re.compile(r"ld\.param\.[\w.]+\s+(%\w+),\s*\[(\w+_param_(\d+))(?:\+\d+)?\]")
_WIDTH = re.compile(r"\.(?:b|u|s|f)(8|16|32|64)\b")
_VEC = re.compile(r"\.v(2|4|8)\b")


@dataclass
class Access:
    kind: str  # "load" or "store"
    bytes: int  # per thread per instruction; 0 for a TMA bulk copy
    params: frozenset  # pointer-argument indices the address derives from
    text: str


@dataclass
class PtxSummary:
    pointer_params: list[int]  # PTX parameter indices that are pointers (in declaration order)
    accesses: list[Access] = field(default_factory=list)
    tensor_core: str = "none"  # "wgmma", "mma" or "none"

    def widths(self) -> dict:
        """``{param_index: {"load": (min, max) bytes, "store": (min, max)}}`` over all accesses."""
        out: dict = defaultdict(dict)
        for a in self.accesses:
            for p in a.params:
                lo, hi = out[p].get(a.kind, (None, None))
                b = a.bytes
                out[p][a.kind] = (b if lo is None else min(lo, b), b if hi is None else max(hi, b))
        return dict(out)


def _instructions(ptx: str):
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line or line.startswith((".", "$", "{", "}")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line).rstrip(";").strip()
        if line:
            yield line


def _access_bytes(op: str, line: str) -> int:
    if op.startswith("cp.async.bulk"):
        return 0
    if op.startswith("cp.async"):  # cp.async.cg.shared.global [smem], [global], size(, src-size)
        m = re.search(r"\]\s*,\s*(0x[0-9a-fA-F]+|\d+)", line)
        return int(m.group(1), 0) if m else 0
    w = _WIDTH.search(op)
    v = _VEC.search(op)
    return (int(w.group(1)) // 8 if w else 4) * (int(v.group(1)) if v else 1)


def analyse(ptx: str, pointers_only: bool = True) -> PtxSummary:
    """``pointers_only``: count only parameters declared ``.ptr`` (Triton); CUDA C++ kernels that pass
    pointers inside structs need ``False`` (every parameter is a candidate)."""
    pointers = [int(m.group(3)) for m in _PARAM_DECL.finditer(ptx) if ".ptr" in m.group(1) or not pointers_only]
    insns = list(_instructions(ptx))
    taint: dict[str, frozenset] = defaultdict(frozenset)
    for line in insns:
        m = _LD_PARAM.search(line)
        if m:
            taint[m.group(1)] = taint[m.group(1)] | {int(m.group(3))}
    changed = True
    while changed:
        changed = False
        for line in insns:
            op = line.split(None, 1)[0]
            if op.startswith(("ld.param", "st.", "cp.async", "bar", "red.", "atom.", "wgmma", "fence", "ret")):
                continue
            rest = line[len(op):]
            if op.startswith(("ld.", "ldmatrix", "tex")):
                continue  # loaded data carries no address taint
            regs = _REG.findall(rest)
            if not regs:
                continue
            # destinations: the first operand (a register, a {vector} or a predicate pair "%p1|%p2")
            first = rest.split(",", 1)[0]
            if "{" in rest.split(",", 1)[0] or rest.lstrip().startswith("{"):
                first = rest[: rest.index("}") + 1]
            dests = _REG.findall(first)
            srcs = [r for r in regs if r not in dests] or []
            t = frozenset().union(*(taint[r] for r in srcs)) if srcs else frozenset()
            for d in dests:
                if not t <= taint[d]:
                    taint[d] = taint[d] | t
                    changed = True
    summary = PtxSummary(pointer_params=pointers)
    for line in insns:
        op = line.split(None, 1)[0]
        kind = None
        if op.startswith("ld.global") or op.startswith("cp.async.ca") or op.startswith("cp.async.cg") \
                or op.startswith("cp.async.bulk.tensor") and "global" in op:
            kind = "load"
        elif op.startswith("st.global"):
            kind = "store"
        elif op.startswith("cp.async.bulk") and "shared::cluster.global" in op:
            kind = "load"
        if kind is None:
            continue
        addrs = re.findall(r"\[([^\]]*)\]", line)
        if op.startswith("cp.async") and not op.startswith("cp.async.bulk.tensor"):
            addrs = addrs[1:2]  # [smem], [global]
        params = frozenset().union(*(taint[r] for a in addrs for r in _REG.findall(a))) if addrs else frozenset()
        params = frozenset(p for p in params if p in pointers)
        summary.accesses.append(Access(kind, _access_bytes(op, line), params, line))
    if "wgmma.mma_async" in ptx:
        summary.tensor_core = "wgmma"
    elif "mma.sync" in ptx:
        summary.tensor_core = "mma"
    return summary
