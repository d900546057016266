"""The audit's row type, shared by the Triton and CUDA parts, and its table/JSON/markdown output."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


@dataclass
class KernelRow:
    """What the compiler produced for one kernel in one compile-time configuration.

    ``loads``/``stores`` map an operand (kernel argument name) to the widest and narrowest global access in
    bytes per thread per instruction (``"16"``; ``"2-16"`` when both occur; ``"tma"`` for bulk tensor copies).
    ``spill_bytes`` is the local-memory frame (register spills or stack arrays); ``tensor_core`` is
    ``wgmma`` (Hopper warpgroup MMA, SASS ``HGMMA``), ``mma`` (warp-level, SASS ``HMMA``) or ``none``.
    """

    backend: str
    kernel: str
    config: str
    dtype: str
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    tensor_core: str = "none"
    loads: dict = field(default_factory=dict)
    stores: dict = field(default_factory=dict)
    cases: list = field(default_factory=list)
    error: str = ""
    calls: int = -1  # CALL instructions in the SASS (-1: not counted)

    @property
    def ok(self) -> bool:
        return not self.error

    def asdict(self) -> dict:
        return asdict(self)


def _fmt_access(d: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


HEADER = ["backend", "kernel", "config", "dtype", "regs", "spill B", "smem B", "tensor core", "loads (B/thread)",
          "stores (B/thread)", "calls", "cases"]


def _cells(r: KernelRow) -> list[str]:
    if r.error:
        return [r.backend, r.kernel, r.config, r.dtype, "ERROR", "", "", "", r.error[:60], "", "", str(len(r.cases))]
    return [r.backend, r.kernel, r.config, r.dtype, str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
            r.tensor_core, _fmt_access(r.loads), _fmt_access(r.stores), "-" if r.calls < 0 else str(r.calls),
            str(len(r.cases))]


def format_table(rows: list[KernelRow]) -> str:
    body = [_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(HEADER, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, body)])


def format_markdown(rows: list[KernelRow]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(out)


def save(rows: list[KernelRow], meta: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "audit.json"), os.path.join(out_dir, "audit.md")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": [r.asdict() for r in rows]}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(format_markdown(rows) + "\n")
    return paths
