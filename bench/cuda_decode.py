"""Few-token (decode) Monarch products on the CUDA backend: predicted and, on a GPU, measured against dense.

``python -m bench.cuda_decode`` prints the H100 predictions of ``monarch_kernels.cuda_cost`` (no GPU needed):
decode-kernel time, its ratio to the floor max(weight bytes / HBM bandwidth, one launch) and the speedup over
dense cuBLAS, for n = 2048, 4096, 8192, nblocks 4, 16, 64 and T = 1, 4, 16 (bf16, square layers).

``python -m bench.cuda_decode --measure`` (on a GPU) times, in the same run, dense ``F.linear``, the ``cuda``
backend (decode kernels) and the ``triton`` backend on the same data (forward, bf16; weights cold: L2 flushed
between calls) and prints them next to the predictions; :func:`measure_rows` is what ``bench/gpu_check.py`` calls.
"""
from __future__ import annotations

import argparse
import sys

import torch

import monarch_kernels as mk
from monarch_kernels import cuda_cost

SIZES, NBLOCKS, TOKENS = (2048, 4096, 8192), (4, 16, 64), (1, 4, 16)


def predicted_rows(sizes=SIZES, nblocks=NBLOCKS, tokens=TOKENS, dtype: str = "bfloat16") -> list[dict]:
    rows = []
    for n in sizes:
        for nb in nblocks:
            sh = mk.monarch_factor_shapes(n, n, nb)
            for T in tokens:
                est = cuda_cost.decode_monarch(sh.w1_shape, sh.w2_shape, T, dtype)
                dense = cuda_cost.dense(n, n, T, dtype)
                rows.append({"n": n, "nblocks": nb, "T": T, "weight_MB": round((est.hbm_bytes - T * 2 * n * 2) / 1e6, 2),
                             "pred_us": round(est.time_us, 2), "floor_us": round(est.floor_us, 2),
                             "pred_vs_floor": round(est.vs_floor, 2), "dense_pred_us": round(dense.time_us, 2),
                             "pred_x_dense": round(dense.time_us / est.time_us, 2)})
    return rows


def measure_rows(device: torch.device, budget_s: float = 0.05, sizes=SIZES, nblocks=NBLOCKS, tokens=TOKENS) -> list[dict]:
    """Side-by-side forward timings (bf16) of dense, cuda and triton with the predictions (needs a GPU)."""
    from .timing import median_time_us

    status = mk.available_backends()
    impls = [b for b in ("cuda", "triton") if status[b] == "available"]
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        dense_w = (torch.randn(n, n, generator=gen) / n ** 0.5).to(device, torch.bfloat16)
        for nb in nblocks:
            sh = mk.monarch_factor_shapes(n, n, nb)
            w1 = (torch.randn(*sh.w1_shape, generator=gen) * sh.p ** -0.5).to(device, torch.bfloat16)
            w2 = (torch.randn(*sh.w2_shape, generator=gen) * sh.r ** -0.5).to(device, torch.bfloat16)
            for T in tokens:
                x = torch.randn(T, n, generator=gen).to(device, torch.bfloat16)
                with torch.no_grad():
                    t = {"dense": median_time_us(lambda: torch.nn.functional.linear(x, dense_w), device, budget_s=budget_s)}
                    for b in impls:
                        t[b] = median_time_us(lambda b=b: mk.monarch_matmul(x, w1, w2, backend=b), device, budget_s=budget_s)
                est = cuda_cost.decode_monarch(sh.w1_shape, sh.w2_shape, T)
                row = {"n": n, "nblocks": nb, "T": T, "auto": mk.resolve_backend("monarch", x, w1, w2),
                       "dense_us": round(t["dense"], 2)}
                for b in impls:
                    row[f"{b}_us"] = round(t[b], 2)
                    row[f"{b}_x_dense"] = round(t["dense"] / t[b], 2)
                if "cuda" in t:
                    row["cuda_vs_floor"] = round(t["cuda"] / est.floor_us, 2)
                row["pred_us"] = round(est.time_us, 2)
                rows.append(row)
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = [title, "  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="also time dense, cuda and triton on the GPU")
    args = p.parse_args(argv)
    print(format_rows(predicted_rows(), "predicted H100 time, bf16 forward, square n x n (monarch_kernels.cuda_cost)"))
    if args.measure:
        if not torch.cuda.is_available():
            print("error: --measure needs a CUDA device", file=sys.stderr)
            return 2
        print()
        print(format_rows(measure_rows(torch.device("cuda")), f"measured on {torch.cuda.get_device_name()}, bf16 forward"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
