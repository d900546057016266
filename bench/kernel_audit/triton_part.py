"""Triton part of the audit: run the backend's host functions on ``meta`` tensors with compile-only
launches (:mod:`.offline`) over the shapes, dtypes, ops and paths the dispatcher can take, and describe every
distinct compiled kernel (:class:`~.rows.KernelRow`).

The host functions choose tiles, groups and paths exactly as on a GPU (the device description they size
themselves for is the H100's, see :func:`h100_host`), so the audit follows the kernels as they change.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

from . import ptx as ptx_mod
from . import sass
from .offline import Launch, compile_only
from .rows import KernelRow

#: (T, n_in, n_out, nblocks): the benchmark shapes (bench/ops.py GPU_SHAPES), a ragged one, a decode one, and
#: two token counts that are not a multiple of 16 at aligned widths (token-major buffers touched to their
#: padding, :func:`monarch_kernels.triton._common.touch_rows`)
SHAPES = [(16384, 1024, 1024, 32), (16384, 2048, 2048, 32), (16384, 4096, 4096, 64), (16384, 768, 3072, 4),
          (16384, 3072, 768, 4), (65536, 4096, 4096, 64), (333, 1000, 3000, 4), (16, 4096, 4096, 64),
          (1000, 4096, 4096, 64), (1000, 768, 3072, 4)]
QUICK_SHAPES = [(16384, 1024, 1024, 32), (16384, 4096, 4096, 64), (16384, 768, 3072, 4)]
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Case:
    label: str
    run: Callable[[], None]


@contextlib.contextmanager
def h100_host():
    """Host-side sizing as on an H100 SXM (132 SMs, 50 MB L2) although no GPU is present."""
    from monarch_kernels.triton import _common

    saved = _common.device_info
    _common.device_info = lambda device: _common.DeviceInfo(num_sms=132, l2_bytes=50 * 2**20)
    try:
        yield
    finally:
        _common.device_info = saved


def monarch_cases(shapes: Iterable[tuple], dtypes: Iterable[str]) -> list[Case]:
    import torch

    import monarch_kernels as mk
    from monarch_kernels import triton as backend
    from monarch_kernels.triton import monarch as tmon

    cases = []
    for T, n_in, n_out, nb in shapes:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        for dname in dtypes:
            dtype = getattr(torch, dname)
            meta = lambda *s: torch.empty(*s, dtype=dtype, device="meta")
            x, g, b = meta(T, n_in), meta(T, n_out), meta(n_out)
            w1, w2 = meta(*sh.w1_shape), meta(*sh.w2_shape)
            tag = f"T={T} {n_in}->{n_out} nb={nb} {dname}"
            paths = ["auto"] + [p for p in tmon.PATHS if p != "auto" and tmon.path_applies(sh, p)]
            for path in paths:
                cases.append(Case(f"monarch fwd bias+gelu path={path} {tag}",
                                  lambda x=x, w1=w1, w2=w2, b=b, n=n_out, p=path: tmon.forward(
                                      x, w1, w2, b, n, "gelu", path=p)))
                cases.append(Case(f"monarch fwd path={path} {tag}",
                                  lambda x=x, w1=w1, w2=w2, n=n_out, p=path: tmon.forward(x, w1, w2, None, n, path=p)))
                if path == "two_kernel":  # the selectable chunked schedule (plan.CHUNK_IN_L2, off by default)
                    cases.append(Case(f"monarch fwd chunked path={path} {tag}", _with_plan(
                        lambda x=x, w1=w1, w2=w2, n=n_out: tmon.forward(x, w1, w2, None, n, path="two_kernel"),
                        CHUNK_IN_L2=True)))
                cases.append(Case(f"monarch fwd_saving bias+gelu path={path} {tag}",
                                  lambda x=x, w1=w1, w2=w2, b=b, n=n_out, p=path: tmon.forward_saving(
                                      x, w1, w2, b, n, "gelu", path=p)))
                cases.append(Case(f"monarch bwd_epilogue bias+gelu path={path} {tag}",
                                  lambda x=x, g=g, w1=w1, w2=w2, b=b, n=n_in, p=path: tmon.backward_epilogue(
                                      x, g, w1, w2, b, n, "gelu", True)))
                if path == "auto":  # no bias: the derivative's pass without the column sums
                    cases.append(Case(f"monarch bwd_epilogue gelu path={path} {tag}",
                                      lambda x=x, g=g, w1=w1, w2=w2, n=n_in: tmon.backward_epilogue(
                                          x, g, w1, w2, None, n, "gelu", True)))
                cases.append(Case(f"monarch bwd path={path} {tag}",
                                  lambda x=x, g=g, w1=w1, w2=w2, n=n_in, p=path: tmon.backward(
                                      x, g, w1, w2, n, path=p)))
                cases.append(Case(f"monarch bwd_input path={path} {tag}",
                                  lambda g=g, w1=w1, w2=w2, n=n_in, p=path: tmon.backward_input(g, w1, w2, n, path=p)))
                cases.append(Case(f"monarch bwd_weight path={path} {tag}",
                                  lambda x=x, g=g, w1=w1, w2=w2, p=path: tmon.backward_weight(x, g, w1, w2, path=p)))
            for training in (False, True):
                mlp = _mlp_case(T, n_in, n_out, nb, dname, tag, training)
                if mlp is not None:
                    cases.append(mlp)
            k, q, p = sh.w1_shape
            gy = meta(T, k * q)
            cases.append(Case(f"blockdiag fwd+wgrad {tag}",
                              lambda x=x, w=w1, gy=gy, k=k, q=q, p=p: (backend.blockdiag_fwd(x, w, None, k * q, "relu"),
                                                                       backend.blockdiag_wgrad(x, gy, k, q, p))))
    return cases


def _mlp_case(T: int, n_in: int, n_hidden: int, nb: int, dname: str, tag: str, training: bool = False,
              frozen: bool = True):
    """The fused MLP (:mod:`monarch_kernels.triton.mlp`) for this layer as fc1 and its transpose-shaped layer as
    fc2, GELU between (a transformer MLP ``n_in -> n_hidden -> n_in``), where the fused kernel takes the pair;
    ``training``: the saving forward and the fused backward (the hidden layer's backward kernel), every factor
    trained and (``frozen``) the three frozen sets that compile their own variants of it."""
    import torch

    import monarch_kernels as mk
    from monarch_kernels.triton import mlp

    dtype = getattr(torch, dname)
    sh1, sh2 = mk.monarch_factor_shapes(n_in, n_hidden, nb), mk.monarch_factor_shapes(n_hidden, n_in, nb)
    if not mlp.fusable(sh1, sh2, n_in, n_hidden, dtype, training):
        return None
    meta = lambda *s: torch.empty(*s, dtype=dtype, device="meta")
    x, b2 = meta(T, n_in), meta(n_in)
    w = (meta(*sh1.w1_shape), meta(*sh1.w2_shape), meta(n_hidden), meta(*sh2.w1_shape), meta(*sh2.w2_shape))
    if not training:
        return Case(f"monarch mlp fwd bias+gelu (hidden layer fused) {tag}",
                    lambda: mlp.mlp_forward(x, *w, b2, n_in, "gelu"))

    def step():
        _, *saved = mlp.mlp_forward_saving(x, *w, b2, n_in, "gelu")
        # every factor trained, then the frozen sets that drop the hidden kernel's stores of a and / or dpre
        for want_dw in ((True,) * 4, (True, False, True, True), (True, True, False, True),
                        (True, False, False, True))[:4 if frozen else 1]:
            mlp.mlp_backward(x, meta(T, n_in), *w, *saved, "gelu", True, want_dw=want_dw)
    return Case(f"monarch mlp train step bias+gelu (hidden layer fused both ways) {tag}", step)


def _with_plan(fn: Callable[[], object], **values) -> Callable[[], object]:
    """``fn`` run with :mod:`monarch_kernels.triton.plan` settings ``values`` (e.g. ``CHUNK_IN_L2=True``: the
    chunked forward's chained kernel, or with ``ONE_LAUNCH=False`` its separate, paired launches)."""
    from monarch_kernels.triton import plan

    from ..gpu_check import _patched

    def run():
        with _patched(plan, **values):
            return fn()
    return run


def ci_cases() -> list[Case]:
    """The CI subset: one launch of every kernel family in its default bf16 configuration (4096 wide with 64
    blocks: two-kernel forward with bias + GELU (the token-major stage 2 and its transposing copy), the chunked
    schedule chained and paired, the fused backward, and a 16-token forward; 1024 with 32 blocks: the fused
    square forward; 768 -> 3072 with 4 blocks: whole-row permuted runs and the gathered
    multi-K dy; the GPT-2 MLP with its hidden layer fused; a forward and backward at a token count that is not a
    multiple of 16, where token-major accesses need the padded row bound), about twenty-five compiles."""
    import torch

    import monarch_kernels as mk
    from monarch_kernels.triton import monarch as tmon

    meta = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")
    sh = mk.monarch_factor_shapes(4096, 4096, 64)
    sq = mk.monarch_factor_shapes(1024, 1024, 32)
    s4 = mk.monarch_factor_shapes(768, 3072, 4)
    x, g, b = meta(16384, 4096), meta(16384, 4096), meta(4096)
    return [
        Case("monarch fwd bias+gelu T=16384 4096 nb=64 bfloat16",
             lambda: tmon.forward(x, meta(*sh.w1_shape), meta(*sh.w2_shape), b, 4096, "gelu")),
        Case("monarch bwd T=16384 4096 nb=64 bfloat16",
             lambda: tmon.backward(x, g, meta(*sh.w1_shape), meta(*sh.w2_shape), 4096)),
        Case("monarch fwd path=fused T=16384 1024 nb=32 bfloat16",
             lambda: tmon.forward(meta(16384, 1024), meta(*sq.w1_shape), meta(*sq.w2_shape), None, 1024, path="fused")),
        Case("monarch fwd_saving bias+gelu path=fused T=16384 1024 nb=32 bfloat16",  # the kept z's store
             lambda: tmon.forward_saving(meta(16384, 1024), meta(*sq.w1_shape), meta(*sq.w2_shape), meta(1024), 1024,
                                         "gelu", path="fused")),
        # every block in one group (whole-row permuted runs, the *_FULL layouts); backward: g copied token-major,
        # then (on the Triton tiles, not the cuBLAS views auto takes here) dy and dw2 on plain tiles
        Case("monarch fwd bias+gelu T=16384 768->3072 nb=4 bfloat16",
             lambda: tmon.forward(meta(16384, 768), meta(*s4.w1_shape), meta(*s4.w2_shape), meta(3072), 3072, "gelu")),
        # eager training: stage 2 also stores the pre-activation (the GELU epilogue's tight budget, one more store)
        Case("monarch fwd_saving bias+gelu T=16384 768->3072 nb=4 bfloat16",
             lambda: tmon.forward_saving(meta(16384, 768), meta(*s4.w1_shape), meta(*s4.w2_shape), meta(3072), 3072,
                                         "gelu")),
        # training backward after a GELU: g·gelu'(pre) written token-major by the derivative's pass, the bias
        # gradient's partial sums on the way
        Case("monarch bwd_epilogue bias+gelu T=16384 768->3072 nb=4 bfloat16",
             lambda: tmon.backward_epilogue(meta(16384, 768), meta(16384, 3072), meta(*s4.w1_shape),
                                            meta(*s4.w2_shape), meta(3072), 768, "gelu", True)),
        Case("monarch bwd T=16384 768->3072 nb=4 bfloat16",
             lambda: tmon.backward(meta(16384, 768), meta(16384, 3072), meta(*s4.w1_shape), meta(*s4.w2_shape), 768,
                                   g_layout="token_major", dxw="separate")),
        # the chunked schedule (plan.CHUNK_IN_L2): one chained launch, and as separate launches (the paired kernel)
        Case("monarch fwd bias+gelu chunked T=16384 4096 nb=64 bfloat16",
             _with_plan(lambda: tmon.forward(x, meta(*sh.w1_shape), meta(*sh.w2_shape), b, 4096, "gelu"),
                        CHUNK_IN_L2=True)),
        Case("monarch fwd bias+gelu chunked separate launches T=16384 4096 nb=64 bfloat16",
             _with_plan(lambda: tmon.forward(x, meta(*sh.w1_shape), meta(*sh.w2_shape), b, 4096, "gelu"),
                        CHUNK_IN_L2=True, ONE_LAUNCH=False)),
        # few tokens: 16-row tiles
        Case("monarch fwd T=16 4096 nb=64 bfloat16",
             lambda: tmon.forward(meta(16, 4096), meta(*sh.w1_shape), meta(*sh.w2_shape), None, 4096)),
        # a GPT-2 MLP with its hidden layer fused (two chained dots, wgmma), and its training step (the backward
        # kernel: three dots per chunk, z1 in registers)
        _mlp_case(16384, 768, 3072, 4, "bfloat16", "T=16384 768->3072->768 nb=4 bfloat16"),
        _mlp_case(16384, 768, 3072, 4, "bfloat16", "T=16384 768->3072->768 nb=4 bfloat16", training=True),
        # a ragged token count: every token-major buffer is read and written to its 16-row padding (the layer's
        # backward here; the MLP's training step below has stage 1's store and stage 2's load)
        Case("monarch bwd_epilogue bias+gelu T=1000 4096 nb=64 bfloat16",
             lambda: tmon.backward_epilogue(meta(1000, 4096), meta(1000, 4096), meta(*sh.w1_shape),
                                            meta(*sh.w2_shape), b, 4096, "gelu", True)),
        _mlp_case(1000, 768, 3072, 4, "bfloat16", "T=1000 768->3072->768 nb=4 bfloat16", training=True, frozen=False),
    ]


def _row_from_launch(launch: Launch) -> KernelRow:
    k = launch.kernel
    md = k.metadata
    sig = k.src.signature
    names = [n for n, t in sig.items() if t != "constexpr"]
    first_ptr = next((t for t in sig.values() if isinstance(t, str) and t.startswith("*")), "?")
    skip = {"UPCAST", "PRECISION"}
    tiles = {n: v for n, v in launch.constexprs.items() if n.isupper() and n not in skip and isinstance(v, (int, bool))}
    config = " ".join(f"{n}={int(v)}" for n, v in tiles.items()) + f" w{md.num_warps} s{md.num_stages}"
    row = KernelRow(backend="triton", kernel=launch.fn_name, config=config, dtype=first_ptr.lstrip("*"))
    summary = ptx_mod.analyse(k.asm["ptx"])
    for p_idx, kinds in summary.widths().items():
        name = names[p_idx] if p_idx < len(names) else f"param{p_idx}"
        for kind, (lo, hi) in kinds.items():
            text = "tma" if hi == 0 else (str(hi) if lo == hi else f"{lo}-{hi}")
            (row.loads if kind == "load" else row.stores)[name] = text
    usage = sass.resource_usage(k.asm["cubin"])
    fn = usage.get(md.name) or next(iter(usage.values()), {})
    row.registers = fn.get("REG", -1)
    row.spill_bytes = max(fn.get("STACK", 0), fn.get("LOCAL", 0))  # stack frame: spills and local arrays
    row.shared_bytes = max(md.shared, fn.get("SHARED", 0))
    counts = sass.sass_summary(k.asm["cubin"])["counts"]
    row.tensor_core = "wgmma" if counts.get("hgmma") else "mma" if counts.get("hmma") else "none"
    if counts.get("stl") and row.spill_bytes <= 0:
        row.spill_bytes = 1
    return row


def audit(cases: list[Case], capability: int = 90, progress: Callable[[str], None] = lambda s: None) -> list[KernelRow]:
    """Compile every kernel the cases launch; one row per distinct compiled kernel, in first-seen order."""
    rows: dict[str, KernelRow] = {}
    for case in cases:
        with h100_host(), compile_only(capability) as launches:
            try:
                case.run()
                error = ""
            except Exception as exc:  # a kernel that fails to compile is a finding, not a crash
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for launch in launches:
            key = launch.kernel.hash
            if key not in rows:
                rows[key] = _row_from_launch(launch)
                progress(f"{rows[key].kernel} {rows[key].config} {rows[key].dtype}")
            rows[key].cases.append(case.label)
        if error:
            rows[f"error:{case.label}"] = KernelRow("triton", "?", case.label, "", error=error, cases=[case.label])
            progress(f"FAILED {case.label}: {error}")
    return list(rows.values())
