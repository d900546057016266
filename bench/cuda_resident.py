"""Many-token Monarch forward with both factors resident in shared memory — of one CTA
(``csrc/cuda/resident.cuh``) or, for square Monarch past one SM, of a thread-block cluster
(``csrc/cuda/cluster_resident.cuh``): predicted and, on a GPU, checked and measured against dense cuBLAS.

``python -m bench.cuda_resident`` prints the cost model's predictions (``monarch_kernels.cuda_cost.
resident_forward``; H100 SXM and H200 constants; no GPU needed) next to dense cuBLAS and the Triton path priced
the same way, bf16 forward, square layers the kernels take, 16384 and 65536 tokens.

``python -m bench.cuda_resident --measure`` (on a GPU, with the CUDA extension) first checks the kernel per
element against float64 and against the tile kernels (``ext.many_token_kernel("tiles")``), bias + each
activation, ragged token counts, fp16 and bf16 (:func:`check_rows`), then gives the device time of each call
(``torch.profiler``, kernels only: what a CUDA graph or ``torch.compile`` gets) of dense ``F.linear``, the
resident kernel, the tile kernels and the torch reference on the same data (:func:`measure_rows`), and of a
training step (forward keeping the intermediate, then the Triton backward on it: ``backend="cuda"``) beside
dense and the Triton backend's own step (:func:`step_rows`). All are cases of the one GPU check,
``bench/gpu_check.py`` (provider ``cuda_resident``). The predictions' ``step_*`` columns price that training
step (``cuda_cost.resident_training_step``).
"""
from __future__ import annotations

import sys

import torch

import monarch_kernels as mk
from monarch_kernels import cost_model as cm
from monarch_kernels import cuda_cost, ext

from .cuda_decode import extension_on_gpu, run_cli

#: (n, nblocks) of the tables: the 4096/64 and 1024/32 target shapes (cluster and one-CTA kernels), 1024 with
#: 64 blocks, 768 with 24, 512 with 16
LAYERS, TOKENS = ((4096, 64), (1024, 32), (1024, 64), (768, 24), (512, 16)), (16384, 65536)
#: (w1 shape, w2 shape) of the correctness cases: 1024/32, rank 2, fan-out with r = 64, one stage-2 block, l = 3
#: (one-CTA kernel); 4096/64 and 256/16 (cluster kernel: clusters of 8 and 2)
CHECK_FACTORS = [((32, 32, 32), (32, 32, 32)), ((4, 32, 16), (8, 16, 16)), ((4, 64, 16), (4, 64, 64)),
                 ((2, 8, 16), (1, 8, 16)), ((2, 24, 16), (3, 8, 16)), ((64, 64, 64), (64, 64, 64)),
                 ((16, 16, 16), (16, 16, 16))]
CHECK_CASES = ((65, "none"), (333, "relu"), (5000, "gelu"), (1000, "gelu_tanh"))
ELEM_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def predicted_rows(layers=LAYERS, tokens=TOKENS, dtype: str = "bfloat16",
                   devices=(cm.H100_SXM, cm.H200)) -> list[dict]:
    rows = []
    for dev in devices:
        for n, nb in layers:
            for T in tokens:
                pr = cm.Problem.linear(T, n, n, nb)
                k = cuda_cost.resident_forward(pr, dtype, dev)
                if k is None:
                    continue
                t = k.time(dev)
                dense = cm.dense("fwd", pr, dtype, dev).time(dev)
                path = cm.triton_path(pr, dev=dev)
                triton = cm.estimate("triton", path, "fwd", pr, dtype, dev=dev).time(dev)
                ref = cm.estimate("torch", "reference", "fwd", pr, dtype, dev=dev).time(dev)
                hbm = (k.hbm_bytes / t) / dev.hbm_bw
                step = cuda_cost.resident_training_step(pr, dtype, dev).time(dev)
                dense_step = cm.dense("fwdbwd", pr, dtype, dev).time(dev)
                triton_step = cm.estimate("triton", path, "fwdbwd", pr, dtype, dev=dev).time(dev)
                rows.append({"device": dev.name, "n": n, "nblocks": nb, "T": T,
                             "kernel": "cluster" if "cluster" in k.name else "one CTA",
                             "resident_us": round(t * 1e6, 1),
                             "dense_us": round(dense * 1e6, 1), "x_dense": round(dense / t, 2),
                             "triton_us": round(triton * 1e6, 1), "x_triton": round(triton / t, 2),
                             "ref_us": round(ref * 1e6, 1), "x_ref": round(ref / t, 2),
                             "hbm_bw_share": round(hbm, 2),
                             "flops_executed_per_useful": round(k.flops / k.useful_flops, 3),
                             "hbm_MB": round(k.hbm_bytes / 1e6, 1),
                             "step_us": round(step * 1e6, 1), "step_x_dense": round(dense_step / step, 2),
                             "step_x_triton": round(triton_step / step, 2)})
    return rows


def _factors(s1, s2, dtype, device, gen):
    sh = mk.MonarchShape.from_factors(s1, s2)
    w1 = (torch.randn(*s1, generator=gen) * sh.p ** -0.5).to(device, dtype)
    w2 = (torch.randn(*s2, generator=gen) * sh.r ** -0.5).to(device, dtype)
    return sh, w1, w2


def check_rows(device: torch.device) -> list[dict]:
    """The resident forward per element against float64 and against the tile kernels (max |error| / max
    |reference|), outputs of fresh allocations (the kernel must write every element: a NaN fails); ``z_err``: the
    intermediate the training forward keeps (``monarch_fwd_saving``) against float64, where it keeps one."""
    from monarch_kernels import reference as ref
    from monarch_kernels.ext import Primitives as C

    from .cuda_decode import _elem_err

    d = lambda t: t.double()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for s1, s2 in CHECK_FACTORS:
            sh, w1, w2 = _factors(s1, s2, dtype, device, gen)
            b = torch.randn(sh.n_out, generator=gen).to(device, dtype)
            err = vs_tiles = z_err = 0.0
            kept = True
            for T, act in CHECK_CASES:
                x = torch.randn(T, sh.n_in, generator=gen).to(device, dtype)
                out = C.monarch_fwd(x, w1, w2, b, sh.n_out, act)
                want = ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, act)
                err = max(err, _elem_err(out, want))
                with ext.many_token_kernel("tiles"):
                    vs_tiles = max(vs_tiles, _elem_err(out, C.monarch_fwd(x, w1, w2, b, sh.n_out, act)))
                out, z, _ = C.monarch_fwd_saving(x, w1, w2, b, sh.n_out, act)
                err = max(err, _elem_err(out, want))
                if z is None:
                    kept = False
                else:
                    z_want = ref._stage1(d(x), d(w1), sh.l, sh.r).permute(1, 0, 2).reshape(T, -1)
                    z_err = max(z_err, _elem_err(z, z_want))
            rows.append({"dtype": str(dtype).replace("torch.", ""), "w1": s1, "w2": s2,
                         "err": float(f"{err:.2g}"), "vs_tiles": float(f"{vs_tiles:.2g}"),
                         "z_err": float(f"{z_err:.2g}") if kept else None,
                         "ok": err < ELEM_TOL[dtype] and vs_tiles < 2 * ELEM_TOL[dtype] and z_err < ELEM_TOL[dtype]})
    return rows


def measure_rows(device: torch.device, layers=LAYERS, tokens=TOKENS) -> list[dict]:
    """Device time per forward (bf16) of dense, the resident kernel, the tile kernels and the reference, with
    the predictions at the device's constants (needs a GPU and the CUDA extension)."""
    from monarch_kernels import reference as ref
    from monarch_kernels.ext import Primitives as C

    from .timing import device_time_us

    dev = cm.device_for(torch.cuda.get_device_name(device))
    rows = []
    gen = torch.Generator().manual_seed(1)
    for n, nb in layers:
        sh = mk.monarch_factor_shapes(n, n, nb)
        _, w1, w2 = _factors(sh.w1_shape, sh.w2_shape, torch.bfloat16, device, gen)
        dense_w = (torch.randn(n, n, generator=gen) / n ** 0.5).to(device, torch.bfloat16)
        for T in tokens:
            pr = cm.Problem.linear(T, n, n, nb)
            kern = cuda_cost.resident_forward(pr, "bfloat16", dev)
            if kern is None:
                continue
            x = torch.randn(T, n, generator=gen).to(device, torch.bfloat16)
            with torch.no_grad():
                t = {"dense": device_time_us(lambda: torch.nn.functional.linear(x, dense_w)),
                     "resident": device_time_us(lambda: C.monarch_fwd(x, w1, w2, None, n, "none")),
                     "ref": device_time_us(lambda: ref.monarch_fwd(x, w1, w2, None, n))}
                with ext.many_token_kernel("tiles"):
                    t["tiles"] = device_time_us(lambda: C.monarch_fwd(x, w1, w2, None, n, "none"))
            pred = kern.time(dev) * 1e6
            io_gb = 2 * T * n * 2 / 1e9
            rows.append({"n": n, "nblocks": nb, "T": T, "dense_us": round(t["dense"], 1),
                         "resident_us": round(t["resident"], 1), "x_dense": round(t["dense"] / t["resident"], 2),
                         "tiles_us": round(t["tiles"], 1), "ref_us": round(t["ref"], 1),
                         "x_ref": round(t["ref"] / t["resident"], 2), "pred_us": round(pred, 1),
                         "io_GBps": round(io_gb / (t["resident"] * 1e-6), 0)})
    return rows


#: (n, nblocks, T) of the timed training steps: the 4096/64 target
STEP_CASES = ((4096, 64, 16384),)


def step_rows(device: torch.device, cases=STEP_CASES) -> list[dict]:
    """Device time of one bf16 training step (forward, then backward of a random output gradient, through
    autograd) of dense ``F.linear``, of ``backend="cuda"`` (resident forward keeping the intermediate, Triton
    backward on it) and of ``backend="triton"``, with the cost model's price of the ``cuda`` step (needs the
    Triton backend too)."""
    from .timing import device_time_us

    if mk.available_backends()["triton"] != "available":
        return []
    dev = cm.device_for(torch.cuda.get_device_name(device))
    gen = torch.Generator().manual_seed(3)
    rows = []
    for n, nb, T in cases:
        sh = mk.monarch_factor_shapes(n, n, nb)
        _, w1, w2 = _factors(sh.w1_shape, sh.w2_shape, torch.bfloat16, device, gen)
        w1, w2 = w1.requires_grad_(), w2.requires_grad_()
        dense_w = (torch.randn(n, n, generator=gen) / n ** 0.5).to(device, torch.bfloat16).requires_grad_()
        x = torch.randn(T, n, generator=gen).to(device, torch.bfloat16).requires_grad_()
        g = torch.randn(T, n, generator=gen).to(device, torch.bfloat16)
        t = {"dense": device_time_us(lambda: torch.nn.functional.linear(x, dense_w).backward(g))}
        for backend in ("cuda", "triton"):
            t[backend] = device_time_us(lambda: mk.monarch_linear(x, w1, w2, backend=backend).backward(g))
        pred = cuda_cost.resident_training_step(cm.Problem.linear(T, n, n, nb), "bfloat16", dev).time(dev)
        rows.append({"n": n, "nblocks": nb, "T": T, "dense_us": round(t["dense"], 1),
                     "cuda_us": round(t["cuda"], 1), "x_dense": round(t["dense"] / t["cuda"], 2),
                     "triton_us": round(t["triton"], 1), "x_triton": round(t["triton"] / t["cuda"], 2),
                     "pred_us": round(pred * 1e6, 1)})
    return rows


def gpu_check_cases(ctx):
    """Case provider of ``bench/gpu_check.py``: correctness, then device times (GPU with the extension only)."""
    if not extension_on_gpu(ctx):
        return
    yield "cuda resident vs float64", lambda: check_rows(ctx.device)
    yield "cuda resident device time (bf16 fwd)", lambda: measure_rows(ctx.device)
    yield "cuda resident training step (bf16)", lambda: step_rows(ctx.device)


def main(argv=None) -> int:
    return run_cli(argv, "python -m bench.cuda_resident", __doc__, predicted_rows, check_rows, measure_rows,
                   "cost model, bf16 forward, square n x n, MonarchLinear factors",
                   "resident kernels vs float64 and vs the tile kernels (max |error| / max |reference|)",
                   more_measures=[(step_rows, "bf16 training step (resident forward keeping z, Triton backward)")])


if __name__ == "__main__":
    sys.exit(main())
