"""Where the GPU time goes, for one short device call after ``bench/gpu_check.sh`` measured a gap to the model.

``python3 -m bench.gpu_profile --out DIR`` (``bash bench/gpu_profile.sh`` on a lent GPU) prints, row by row
(and appends to ``DIR/gpu_profile.jsonl``):

* ``host``: microseconds of host time per call (``N`` calls back to back at 16 tokens, where the device work is
  a few µs, then one synchronise): the Python dispatch, planning and launch cost that every call pays; then
  a cProfile breakdown of the Triton and reference calls (own µs per call of the top functions);
* ``kernels``: per-kernel device time from ``torch.profiler`` (CUDA activity) for the main forward and
  backward paths, so that a slow path is split into its kernels and host gaps (wall time per call beside the
  summed kernel time);
* ``paths``: device time of every forward (fused, two-kernel with each stage-2 store) and backward variant
  (``dxw`` x ``g_layout``) at the target shapes, beside the torch reference, dense cuBLAS and the cost model's
  picks and prediction (:func:`monarch_kernels.cost_model.device_for` the device);
* ``tiles``: the token-major stages and the transposing copy over tiles, warps and pipeline depths;
* ``decode``: the CUDA decode kernel, Triton and dense cuBLAS replayed from CUDA graphs (device time alone);
* ``sweep``: the block-diagonal kernel alone (``bd_forward``) at 65536 tokens of 4096 features, 64 blocks —
  plain and with a permuted (grouped) output — over row tiles, warps and pipeline depths, timed with CUDA
  events over back-to-back launches (each launch moves ≥ 1 GB, far above any host cost), as achieved GB/s of
  its compulsory bytes next to the plan's own tile.

``--ncu-target`` runs only a few launches of the plan's stage-1 and fused kernels (for ``ncu``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

import monarch_kernels as mk
from monarch_kernels import ext

#: ``--smoke``: tiny shapes on the CPU through the Triton interpreter (tests the script, not the numbers)
SMOKE = False


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def size(full: int, small: int) -> int:
    return small if SMOKE else full


def variants(full: list) -> list:
    """The tile variants a sweep measures: all of them, or the first two in the smoke run (the plan's and one
    override: each interpreted call costs about half a second, and the rest run the same code)."""
    return full[:2] if SMOKE else full


def emit(section: str, row: dict, path: str | None) -> None:
    row = {"section": section, **row}
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=device()) * scale).to(dtype)


def factors(T, n_in, n_out, nb, dtype=torch.bfloat16):
    sh = mk.monarch_factor_shapes(n_in, n_out, nb)
    return rand(T, n_in, dtype=dtype), rand(*sh.w1_shape, dtype=dtype, scale=sh.p ** -0.5), \
        rand(*sh.w2_shape, dtype=dtype, scale=sh.r ** -0.5)


def host_us(fn: Callable[[], object], n: int = 200) -> float:
    n = size(n, 1)
    for _ in range(size(5, 1)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e6


def host_section(jsonl):
    from monarch_kernels.triton import monarch as tmon

    n = size(4096, 256)
    x, w1, w2 = factors(16, n, n, 64 if not SMOKE else 16)
    dense_w = rand(n, n)
    cases = {"dense F.linear": lambda: F.linear(x, dense_w),
             "triton tmon.forward (kernel module)": lambda: tmon.forward(x, w1, w2, None, n),
             "triton mk.monarch_linear": lambda: mk.monarch_linear(x, w1, w2, backend="triton"),
             "torch mk.monarch_linear": lambda: mk.monarch_linear(x, w1, w2, backend="torch"),
             "auto mk.monarch_linear": lambda: mk.monarch_linear(x, w1, w2),
             "cuda mk.monarch_linear": lambda: mk.monarch_linear(x, w1, w2, backend="cuda")}
    if not SMOKE:  # the device time alone: the triton forward replayed from a CUDA graph
        try:
            fwd = cases["triton tmon.forward (kernel module)"]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fwd()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fwd()
            cases["triton tmon.forward, CUDA graph replay"] = graph.replay
        except Exception as e:  # noqa: BLE001
            emit("host", {"case": "graph capture", "error": repr(e)[:300]}, jsonl)
    for name, fn in cases.items():
        try:
            emit("host", {"case": name, "T": 16, "shape": f"{n}/{w1.shape[0]} bf16",
                          "us_per_call": round(host_us(fn), 1)},
                 jsonl)
        except Exception as e:  # noqa: BLE001
            emit("host", {"case": name, "error": repr(e)[:300]}, jsonl)
    for name in ("triton mk.monarch_linear", "torch mk.monarch_linear"):
        host_breakdown(name, cases[name], jsonl)
    # our own host code with the launches as no-ops (bench.host_time): this host's speed against the CPU runs'
    from bench.host_time import measure

    for row in measure(calls=size(200, 2), rounds=size(5, 1), only="T=16 "):
        emit("host", {**row, "case": f"no launches (bench.host_time): {row['case']}"}, jsonl)


def host_breakdown(name: str, fn: Callable[[], object], jsonl, calls: int = 200, top: int = 25) -> None:
    """Where one call's host time goes: cProfile over ``calls`` calls, the ``top`` functions by own time, in µs
    per call (Triton's launcher, torch's allocator and this library's planning apart; cProfile's own overhead
    inflates every entry by about the same amount per Python call)."""
    import cProfile
    import pstats

    calls = size(calls, 1)
    try:
        for _ in range(size(5, 1)):
            fn()
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        sync()
    except Exception as e:  # noqa: BLE001
        emit("host", {"case": f"{name}: breakdown", "error": repr(e)[:300]}, jsonl)
        return
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    emit("host", {"case": f"{name}: breakdown", "calls": calls,
                  "own_us_per_call": [[f"{os.path.basename(f)}:{line}({func})", round(v[2] / calls * 1e6, 2),
                                       round(v[0] / calls, 1)] for (f, line, func), v in rows]}, jsonl)


def profile_kernels(name: str, fn: Callable[[], object], jsonl, reps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(size(2, 1)):
        fn()
    sync()
    reps = size(reps, 1)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU if SMOKE else ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync()
    wall = (time.perf_counter() - t0) / reps * 1e6
    total = 0.0
    rows = []
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None)
        if dev is None:
            dev = ev.self_cuda_time_total
        if dev <= 0:
            continue
        total += dev / reps
        rows.append((dev / reps, ev.count / reps, ev.key))
    emit("kernels", {"case": name, "wall_us_per_call": round(wall, 1), "device_us_per_call": round(total, 1)},
         jsonl)
    for dev, count, key in sorted(rows, reverse=True)[:8]:
        emit("kernels", {"case": name, "kernel": key[:90], "calls": count, "us_per_call": round(dev, 1)}, jsonl)


def device_us(fn: Callable[[], object]) -> float:
    """:func:`bench.timing.device_time_us` on the GPU; the smoke run only calls ``fn`` (0.0)."""
    if SMOKE:
        fn()
        return 0.0
    from .timing import device_time_us

    return device_time_us(fn)


PATH_SHAPES = [(16384, 4096, 4096, 64, "none"), (16384, 1024, 1024, 32, "none"), (16384, 2048, 2048, 32, "none"),
               (16384, 768, 3072, 4, "gelu_tanh"), (16384, 3072, 768, 4, "none")]
SMOKE_PATH_SHAPES = [(8, 256, 256, 16, "none"), (8, 48, 192, 4, "gelu_tanh")]


def paths_section(jsonl):
    """Device time of each forward and backward variant next to the cost model's pick (H200 constants)."""
    from monarch_kernels import cost_model as cm
    from monarch_kernels import reference as ref
    from monarch_kernels.triton import monarch as tmon

    dev = cm.device_for(torch.cuda.get_device_name() if not SMOKE else "")
    real_choice = tmon._model_choice
    for T, n_in, n_out, nb, act in SMOKE_PATH_SHAPES if SMOKE else PATH_SHAPES:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        x, w1, w2 = factors(T, n_in, n_out, nb)
        b, g = rand(n_out), rand(T, n_out)
        pr = cm.Problem.linear(T, n_in, n_out, nb, act)
        row = {"shape": f"T={T} {n_in}->{n_out} nb={nb} {act}", "model_path": cm.triton_path(pr, dev=dev),
               "model_store": cm.stage2_store(pr, dev=dev),
               "model_fwd_us": round(cm.estimate("triton", cm.triton_path(pr, dev=dev), "fwd", pr, dev=dev)
                                     .time(dev) * 1e6, 1),
               "dense_us": round(device_us(lambda wd=rand(n_out, n_in): F.linear(x, wd)), 1),
               "torch_us": round(device_us(lambda: mk.monarch_linear(x, w1, w2, b, activation=act,
                                                                     backend="torch")), 1),
               "auto_us": round(device_us(lambda: tmon.forward(x, w1, w2, b, activation=act)), 1)}
        for store in ("grouped", "token_major"):
            tmon._model_choice = lambda q, *a, store=store, **k: (store if q.startswith("stage2_store")
                                                                 else real_choice(q, *a, **k))
            try:
                row[f"two_kernel_{store}_us"] = round(device_us(
                    lambda: tmon.forward(x, w1, w2, b, activation=act, path="two_kernel")), 1)
            finally:
                tmon._model_choice = real_choice
        if tmon.path_applies(sh, "fused"):
            row["fused_us"] = round(device_us(lambda: tmon.forward(x, w1, w2, b, activation=act, path="fused")), 1)
        emit("paths", row, jsonl)
        if not SMOKE and (n_in, n_out, nb) not in ((4096, 4096, 64), (768, 3072, 4)):  # backward: two shapes
            continue
        brow = {"shape": row["shape"], "model_dxw": tmon._model_choice("dxw_choice", T, n_in, n_out, sh, x.dtype),
                "model_g": tmon._model_choice("g_readers", T, n_in, n_out, sh, x.dtype),
                "model_bwd_us": round(cm.estimate("triton", "two_kernel", "bwd", pr, dev=dev).time(dev) * 1e6, 1),
                "torch_bwd_us": round(device_us(lambda: ref.monarch_bwd(x, g, w1, w2, n_in)), 1),
                "auto_bwd_us": round(device_us(lambda: tmon.backward(x, g, w1, w2)), 1)}
        for dxw in ("fused", "separate", "bmm"):
            for lay in ("row_major", "token_major", "bmm"):
                try:
                    brow[f"bwd_{dxw}_{lay}_us"] = round(device_us(
                        lambda: tmon.backward(x, g, w1, w2, dxw=dxw, g_layout=lay)), 1)
                except ValueError:  # bmm needs whole blocks
                    pass
        emit("paths", brow, jsonl)
    ragged_tokens(jsonl)


def ragged_tokens(jsonl):
    """The default forward and backward 8 tokens short of 16384 (not a multiple of 16) against 16384 itself, at
    4096/64 and GPT-2's fc1: token-major buffers are touched to their 16-row padding (RESULTS §7h), so the two
    should take the same device time (before, every token-major access of the ragged count was 2 bytes wide)."""
    from monarch_kernels.triton import monarch as tmon

    for n_in, n_out, nb, act in ((size(4096, 256), size(4096, 256), size(64, 16), "none"),
                                 (size(768, 48), size(3072, 192), 4, "gelu_tanh")):
        row = {"shape": f"{n_in}->{n_out} nb={nb} {act}"}
        for T in (size(16384, 32), size(16384, 32) - 8):
            x, w1, w2 = factors(T, n_in, n_out, nb)
            b, g = rand(n_out), rand(T, n_out)
            row[f"T={T} fwd_us"] = round(device_us(lambda: tmon.forward(x, w1, w2, b, activation=act)), 1)
            row[f"T={T} bwd_us"] = round(device_us(lambda: tmon.backward(x, g, w1, w2)), 1)
        emit("paths", row, jsonl)


def tiles_section(jsonl):
    """The token-major stages (row-major -> token-major with P1; token-major -> token-major with P2) and the
    transposing copy at 65536 x 4096/64 over tiles, warps and pipeline depths: achieved GB/s of their bytes; then
    the fused MLP backward's tiles (:func:`mlp_backward_tiles`)."""
    from monarch_kernels.triton import blockdiag as tbd
    from monarch_kernels.triton import plan
    from monarch_kernels.triton import token_major as ttm
    from monarch_kernels.triton import _common

    T, n, nb = size(65536, 16), size(4096, 256), size(64, 16)
    x = rand(T, n)
    w = rand(nb, n // nb, n // nb, scale=(n // nb) ** -0.5)
    zt = _common.empty_token_major(T, n, device=device(), dtype=torch.bfloat16)
    yt = _common.empty_token_major(T, n, device=device(), dtype=torch.bfloat16)
    y = torch.empty(T, n, device=device(), dtype=torch.bfloat16)
    nbytes = 2 * T * n * 2
    real_tile, real_copy = plan.bd_tile, plan.COPY_TILE
    cases = {"stage1 row->token-major P1": lambda: tbd.bd_forward(x, w, out_perm=(nb, n // nb), out=zt),
             "stage2 token-major->token-major P2": lambda: tbd.bd_forward(zt, w, out_perm=(n // nb, nb), out=yt)}
    for name, fn in cases.items():
        for v in variants([None] + [(bm, wp, st) for bm in (64, 128) for wp in (4, 8) for st in (2, 3)]):
            def tile(*a, v=v, **k):
                t = real_tile(*a, **k)
                return t if v is None else plan.Tile(v[0], t.block_n, t.block_k, t.group, v[1], v[2])
            plan.bd_tile = tile
            plan.bd_launch.cache_clear()
            try:
                emit("tiles", {"kernel": name, "variant": "plan" if v is None else str(v), "us": round(
                    us := events_us(fn), 1), "GBps": round(nbytes / us / 1e3)}, jsonl)
            except Exception as e:  # noqa: BLE001
                emit("tiles", {"kernel": name, "variant": str(v), "error": repr(e)[:300]}, jsonl)
            finally:
                plan.bd_tile = real_tile
                plan.bd_launch.cache_clear()
    for bt, bn, wp in variants([(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (128, 32, 4)]):
        plan.COPY_TILE = plan.Tile(bt, bn, 0, 1, wp, 1)
        try:
            emit("tiles", {"kernel": "copy token-major -> row-major", "variant": f"{bt}x{bn} w{wp}",
                           "us": round(us := events_us(lambda: ttm.copy_into(yt, y)), 1),
                           "GBps": round(nbytes / us / 1e3)}, jsonl)
        except Exception as e:  # noqa: BLE001
            emit("tiles", {"kernel": "copy", "variant": f"{bt}x{bn}", "error": repr(e)[:300]}, jsonl)
        finally:
            plan.COPY_TILE = real_copy
    mlp_backward_tiles(jsonl)  # last: under the section's time limit, a slow compile loses only these rows


def mlp_backward_tiles(jsonl):
    """The fused GPT-2 MLP's hidden-layer backward (16384 tokens, 768 -> 3072 -> 768 in 4 blocks, bias + GELU) at
    the plan's tile (16-row chunks: no spill on triton 3.6, RESULTS §7g) against the 32-row chunks it had (32 B
    spilled on 3.6) and 64-token tiles (no spill, the weights read from L2 twice as often)."""
    from monarch_kernels.triton import mlp as tmlp
    from monarch_kernels.triton import plan
    from monarch_kernels.triton import _common

    T, d, nb = size(16384, 16), size(768, 64), 4
    sh1, sh2 = mk.monarch_factor_shapes(d, 4 * d, nb), mk.monarch_factor_shapes(4 * d, d, nb)
    z1 = _common.empty_token_major(T, sh1.n_mid, device=device(), dtype=torch.bfloat16).copy_(rand(T, sh1.n_mid))
    dy2 = _common.empty_token_major(T, sh2.n_mid, device=device(), dtype=torch.bfloat16).copy_(rand(T, sh2.n_mid))
    w2a, b1 = rand(*sh1.w2_shape, scale=sh1.r ** -0.5), rand(4 * d)
    w1v = tmlp.regroup(rand(*sh2.w1_shape, scale=sh2.p ** -0.5), sh2, sh1.l)
    nbytes = 2 * T * (2 * sh1.n_mid + sh2.n_mid + 2 * 4 * d)  # z1, dy2 read; a, dpre, dz1 written
    real = plan.MLP_BWD_TILE
    for v in (None, plan.Tile(128, 32, 64, 1, 8, 2), plan.Tile(64, 32, 64, 1, 8, 2)):
        plan.MLP_BWD_TILE = real if v is None else v
        t = plan.MLP_BWD_TILE
        name = f"{t.block_m} tokens x {plan.mlp_block_s(sh2.p // sh1.l, t)}-row chunks w{t.num_warps}"
        try:
            emit("tiles", {"kernel": "mlp hidden backward", "variant": ("plan " if v is None else "") + name,
                           "us": round(us := events_us(lambda: tmlp.hidden_layer_backward(
                               z1, w2a, b1, w1v, dy2, sh2, "gelu")), 1), "GBps": round(nbytes / us / 1e3)}, jsonl)
        except Exception as e:  # noqa: BLE001
            emit("tiles", {"kernel": "mlp hidden backward", "variant": name, "error": repr(e)[:300]}, jsonl)
        finally:
            plan.MLP_BWD_TILE = real


def events_us(fn: Callable[[], object], launches: int = 10) -> float:
    """Median over three rounds of ``launches`` back-to-back calls (each moving >= 1 GB: the host keeps ahead); the
    smoke run times one call, with no warm-up."""
    if not SMOKE:
        fn()
        sync()
    times = []
    for _ in range(size(3, 1)):
        t0 = time.perf_counter()
        for _ in range(size(launches, 1)):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / size(launches, 1) * 1e6)
    return sorted(times)[len(times) // 2]


def decode_section(jsonl):
    """The CUDA decode kernels (the default cooperative one and the row-split one, ``ext.decode_kernel``) and
    dense cuBLAS replayed from CUDA graphs (device time without the host's), T = 1, 4, 16, n = 2048 / 4096 /
    8192, 4 and 64 blocks."""
    for n in (2048, 4096, 8192):
        for nb in (4, 64):
            for T in (1, 4, 16):
                x, w1, w2 = factors(T, n, n, nb)
                wd = rand(n, n)
                row = {"n": n, "nblocks": nb, "T": T}
                cuda = lambda: mk.monarch_linear(x, w1, w2, backend="cuda")
                for name, fn, kernel in (("dense", lambda: F.linear(x, wd), None), ("cuda", cuda, "cooperative"),
                                         ("cuda_rowsplit", cuda, "rowsplit"),
                                         ("triton", lambda: mk.monarch_linear(x, w1, w2, backend="triton"), None)):
                    try:
                        with ext.decode_kernel(kernel) if kernel else contextlib.nullcontext():
                            row[f"{name}_graph_us"] = round(graph_us(fn), 2)  # the graph keeps the kernel
                    except Exception as e:  # noqa: BLE001
                        row[f"{name}_error"] = repr(e)[:200]
                for name in ("cuda", "cuda_rowsplit"):
                    if f"{name}_graph_us" in row:
                        row[f"{name}_x_dense"] = round(row["dense_graph_us"] / row[f"{name}_graph_us"], 2)
                emit("decode", row, jsonl)


def graph_us(fn: Callable[[], object], replays: int = 200) -> float:
    """Mean time of one ``fn`` replayed from a CUDA graph of 20 calls (rotating nothing: decode weights are
    small enough to stay in the 60 MB L2 only at n = 2048 with 64 blocks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays // 20):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) * 1e3 / replays


def kernels_section(jsonl):
    from monarch_kernels.triton import monarch as tmon
    from monarch_kernels.triton import plan

    from .gpu_check import _patched

    T, n, nb = size(16384, 8), size(4096, 256), size(64, 16)
    x, w1, w2 = factors(T, n, n, nb)
    dense_w = rand(n, n)
    g = rand(T, n)
    cases = [
        ("dense fwd 16384 4096", lambda: F.linear(x, dense_w), {}),
        ("torch ref fwd 16384 4096/64", lambda: mk.monarch_linear(x, w1, w2, backend="torch"), {}),
        ("triton fwd 16384 4096/64 (plan)", lambda: tmon.forward(x, w1, w2), {}),
        ("triton fwd 16384 4096/64 chunked (chained)", lambda: tmon.forward(x, w1, w2, path="two_kernel"),
         dict(CHUNK_IN_L2=True)),
        ("triton fwd 16384 4096/64 chunked, separate launches",
         lambda: tmon.forward(x, w1, w2, path="two_kernel"), dict(CHUNK_IN_L2=True, ONE_LAUNCH=False)),
        ("triton bwd 16384 4096/64", lambda: tmon.backward(x, g, w1, w2), {}),
    ]
    x2, v1, v2 = factors(T, size(1024, 64), size(1024, 64), size(32, 8))
    cases.append(("triton fwd 16384 1024/32 (plan)", lambda: tmon.forward(x2, v1, v2), {}))
    x3, u1, u2 = factors(T, size(768, 48), size(3072, 192), 4)
    b3 = rand(u2.shape[0] * u2.shape[1])
    cases.append(("triton fwd 16384 768->3072/4 bias+gelu",
                  lambda: tmon.forward(x3, u1, u2, b3, activation="gelu_tanh"), {}))
    cases.append(("torch ref fwd 16384 768->3072/4",
                  lambda: mk.monarch_linear(x3, u1, u2, b3, activation="gelu_tanh", backend="torch"), {}))
    for name, fn, plan_values in cases:
        try:
            with _patched(plan, **plan_values):
                profile_kernels(name, fn, jsonl)
        except Exception as e:  # noqa: BLE001
            emit("kernels", {"case": name, "error": repr(e)[:300]}, jsonl)


def sweep_section(jsonl):
    from monarch_kernels.triton import blockdiag as tbd
    from monarch_kernels.triton import plan

    T, n, nb = size(65536, 16), size(4096, 256), size(64, 16)
    x = rand(T, n)
    w = rand(nb, n // nb, n // nb, scale=(n // nb) ** -0.5)
    y = torch.empty(T, n, device=device(), dtype=torch.bfloat16)
    nbytes = 2 * T * n * 2
    real_tile = plan.bd_tile
    for layout_name, kw in (("plain", {}), ("permuted out", dict(out_perm=(nb, n // nb)))):
        chosen = plan.bd_launch(T, nb, n // nb, n // nb, 2, None, kw.get("out_perm")).tile
        for v in variants([None] + [(bm, wp, st) for bm in (64, 128) for wp in (4, 8) for st in (2, 4)]):
            def tile(*a, v=v, **k):
                t = real_tile(*a, **k)
                if v is None:
                    return t
                return plan.Tile(v[0], t.block_n, t.block_k, t.group, v[1], v[2])
            plan.bd_tile = tile
            try:
                fn = lambda: tbd.bd_forward(x, w, out=y, **kw)
                if not SMOKE:  # warm-up (compiles); the smoke run times its one call
                    fn()
                    sync()
                times = []
                for _ in range(size(3, 1)):
                    t0 = time.perf_counter()
                    for _ in range(size(10, 1)):
                        fn()
                    sync()  # each launch moves >= 1 GB: host time per launch is far below device time
                    times.append((time.perf_counter() - t0) / size(10, 1) * 1e6)
                us = sorted(times)[len(times) // 2]
                t = tile(T, nb, n // nb, n // nb, 2, chosen.group, False)
                emit("sweep", {"layout": layout_name, "tile": "plan" if v is None else "variant",
                               "block_m": t.block_m, "block_n": t.block_n, "block_k": t.block_k, "group": t.group,
                               "warps": t.num_warps, "stages": t.num_stages, "us": round(us, 1),
                               "GBps": round(nbytes / us / 1e3)}, jsonl)
            except Exception as e:  # noqa: BLE001
                emit("sweep", {"layout": layout_name, "variant": str(v), "error": repr(e)[:300]}, jsonl)
            finally:
                plan.bd_tile = real_tile


def ncu_target():
    """A few launches for ``ncu``: the default two-kernel forward at 16384 x 4096/64 (its two block-diagonal
    kernels and the transposing copy where the model picks the token-major store) and the fused square kernel
    at 1024/32, three times each (``gpu_profile.sh`` skips the first round)."""
    from monarch_kernels.triton import monarch as tmon

    x, w1, w2 = factors(16384, 4096, 4096, 64)
    x2, v1, v2 = factors(16384, 1024, 1024, 32)
    for _ in range(3):
        tmon.forward(x, w1, w2, path="two_kernel")
        tmon.forward(x2, v1, v2, path="fused")
    sync()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/out/gpu")
    p.add_argument("--only", default="paths,tiles,host")
    p.add_argument("--ncu-target", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = p.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if args.ncu_target:
        ncu_target()
        return
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "gpu_profile.jsonl")
    sections = {"host": host_section, "kernels": kernels_section, "sweep": sweep_section, "paths": paths_section,
                "tiles": tiles_section, "decode": decode_section}
    for name in args.only.split(","):
        t0 = time.time()
        try:
            sections[name](jsonl)
        except Exception as e:  # noqa: BLE001
            emit(name, {"error": repr(e)[:300]}, jsonl)
        print(f"== {name}: {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
