"""``python -m bench.kernel_audit --model``: the cost model's H100 predictions for the performance targets.

Each row prices one op at one shape on the Triton path ``auto`` takes (:mod:`monarch_kernels.cost_model`) and,
for a forward the CUDA extension's resident kernels take, on those (:func:`monarch_kernels.cuda_cost.
resident_forward`: path ``cuda resident``, one CTA per SM, or ``cuda cluster``, factors spread over a cluster;
a training step there, ``... + triton bwd``: that forward keeping the intermediate, then the Triton backward on
it, :func:`monarch_kernels.cuda_cost.resident_training_step`),
next to dense cuBLAS ``F.linear`` and the torch reference modelled the same way: predicted time, ratios, FLOPs
executed over useful, HBM and L2 bytes, launches and the share of the copy bandwidth the ideal traffic
(``x + out + weights``) would imply at the predicted time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from monarch_kernels import cost_model as cm
from monarch_kernels import cuda_cost

#: the same device with a faster L2 (the least certain constant): how much the verdicts depend on it
FAST_L2 = replace(cm.H100_SXM, name="H100 SXM, L2 10 TB/s", l2_bw=10e12)

#: (label, T, n_in, n_out, nblocks, op, target ratio vs dense, target ratio vs torch reference, min % copy BW)
TARGETS = [
    ("4096/64 fwd", 16384, 4096, 4096, 64, "fwd", 5.0, 2.0, 70),
    ("4096/64 fwd", 65536, 4096, 4096, 64, "fwd", 5.0, 2.0, 70),
    ("4096/64 fwd+bwd", 16384, 4096, 4096, 64, "fwdbwd", 3.0, 2.0, None),
    ("4096/64 fwd+bwd", 65536, 4096, 4096, 64, "fwdbwd", 3.0, 2.0, None),
    ("1024/32 fwd", 16384, 1024, 1024, 32, "fwd", 1.3, None, None),
    ("1024/32 fwd", 65536, 1024, 1024, 32, "fwd", 1.3, None, None),
    ("2048/32 fwd", 16384, 2048, 2048, 32, "fwd", None, 2.0, None),
    ("2048/32 fwd+bwd", 16384, 2048, 2048, 32, "fwdbwd", None, 2.0, None),
    ("GPT-2 fc1 768->3072/4 fwd", 16384, 768, 3072, 4, "fwd", None, None, None),
    ("GPT-2 fc2 3072->768/4 fwd", 16384, 3072, 768, 4, "fwd", None, None, None),
]


@dataclass
class ModelRow:
    label: str
    tokens: int
    op: str
    path: str
    us: float
    dense_us: float
    x_dense: float
    x_torch: float
    flop_ratio: float
    hbm_mb: float
    l2_mb: float
    launches: int
    pct_copy_bw: float
    target: str
    met: str
    x_dense_fast_l2: float = float("nan")


def _resident_takes(T, n_in, n_out, nb, op, dtype="bfloat16") -> bool:
    pr = cm.Problem.linear(T, n_in, n_out, nb)
    return op in ("fwd", "fwdbwd") and cuda_cost.resident_forward(pr, dtype, cm.H100_SXM) is not None


def _row(label, T, n_in, n_out, nb, op, want_dense, want_torch, want_bw, dtype="bfloat16", dev=cm.H100_SXM,
         resident=False):
    pr = cm.Problem.linear(T, n_in, n_out, nb)
    if resident:
        kern = cuda_cost.resident_forward(pr, dtype, dev)
        path = "cuda cluster" if "cluster" in kern.name else "cuda resident"
        if op == "fwd":
            cost = cm.Cost([kern])
        else:
            path, cost = path + " + triton bwd", cuda_cost.resident_training_step(pr, dtype, dev)
    else:
        path = cm.triton_path(pr)
        cost = cm.estimate("triton", path, op, pr, dtype, dev)
    dense = cm.dense(op, pr, dtype, dev).time(dev)
    ref = cm.estimate("torch", "reference", op, pr, dtype, dev).time(dev)
    t = cost.time(dev)
    item = cm.ITEMSIZE[dtype]
    sh = pr.shape
    ideal = T * (n_in + n_out) * item + (sh.k * sh.q * sh.p + sh.l * sh.s * sh.r) * item
    pct = 100 * ideal / t / dev.hbm_bw if op == "fwd" else float("nan")
    wants, met = [], []
    if want_dense:
        wants.append(f">= {want_dense}x dense")
        met.append(dense / t >= want_dense)
    if want_torch:
        wants.append(f">= {want_torch}x torch")
        met.append(ref / t >= want_torch)
    if want_bw:
        wants.append(f">= {want_bw}% copy BW")
        met.append(pct >= want_bw)
    return ModelRow(label, T, op, path, round(t * 1e6, 1), round(dense * 1e6, 1), round(dense / t, 2),
                    round(ref / t, 2), round(cost.flops / cost.useful_flops, 2), round(cost.hbm_bytes / 1e6),
                    round(cost.l2_bytes / 1e6), cost.launches, pct, "; ".join(wants) or "-",
                    ("yes" if all(met) else "NO") if met else "-")


def mlp_rows(d: int = 768, nb: int = 4, T: int = 16384, dtype: str = "bfloat16", dev=cm.H100_SXM) -> list[ModelRow]:
    """GPT-2 MLP ``fc2(gelu(fc1(x)))``, ``d -> 4d -> d``: forward and training step (forward + backward).

    Both sides pay the same activation work: dense ``F.gelu`` (one elementwise pass forward: read + write the
    ``T × 4d`` pre-activation, one backward: read ``g`` and the pre-activation, write ``g'``); Monarch fuses the
    forward GELU into fc1's epilogue and, in backward, recomputes the pre-activation as stage 2 of fc1's kept
    intermediate (what ``monarch_kernels.ops`` does in eager training) and is charged one fused elementwise
    pass for ``g · gelu'(pre)`` (the current ``activations.grad`` runs about ten unfused torch ops there: see
    bench/RESULTS.md). Each row is priced twice: the two layers in turn, and :func:`monarch_kernels.monarch_mlp`
    with the hidden layer fused (:func:`monarch_kernels.cost_model.mlp_forward`, GELU fused into it; the training
    step :func:`monarch_kernels.cost_model.mlp_training_step`: GELU's derivative fused into the hidden layer's
    backward kernel). Both layers have a bias, as GPT-2's: every training row pays its two gradients
    (:func:`monarch_kernels.cost_model.bias_grad`).
    """
    fc1 = cm.Problem.linear(T, d, 4 * d, nb, activation="gelu", bias=True)
    fc2 = cm.Problem.linear(T, 4 * d, d, nb, bias=True)
    gelu_fwd = cm.Cost([cm.activation_pass(T, 4 * d, dtype, dev)])
    gelu_bwd = cm.Cost([cm.activation_pass(T, 4 * d, dtype, dev, backward=True)])
    rows = []
    for op, want in (("fwd", 1.8), ("fwdbwd", 1.5)):
        dense = cm.dense("fwd", fc1, dtype, dev) + gelu_fwd + cm.dense("fwd", fc2, dtype, dev)
        mon = (cm.estimate("triton", cm.triton_path(fc1), "fwd", fc1, dtype, dev)
               + cm.estimate("triton", cm.triton_path(fc2), "fwd", fc2, dtype, dev))
        ref = (cm.estimate("torch", "reference", "fwd", fc1, dtype, dev) + gelu_fwd
               + cm.estimate("torch", "reference", "fwd", fc2, dtype, dev))
        if op == "fwdbwd":
            dense = dense + cm.dense("bwd", fc2, dtype, dev) + gelu_bwd + cm.dense("bwd", fc1, dtype, dev)
            # eager training steps: each layer's forward keeps its intermediate, fc1's backward gets the
            # pre-activation from it through stage 2 (cm.training_step)
            mon = (cm.estimate("triton", cm.triton_path(fc1), "fwdbwd", fc1, dtype, dev) + gelu_bwd
                   + cm.estimate("triton", cm.triton_path(fc2), "fwdbwd", fc2, dtype, dev))
            # the reference's training step keeps each layer's intermediate (no stage-1 recompute)
            ref = (cm.estimate("torch", "reference", "fwdbwd", fc1, dtype, dev) + gelu_fwd + gelu_bwd
                   + cm.estimate("torch", "reference", "fwdbwd", fc2, dtype, dev))
        label = f"GPT-2 MLP {d}->{4 * d}->{d}/{nb} {'fwd' if op == 'fwd' else 'train step'}"
        variants = [("+".join(sorted({cm.triton_path(fc1), cm.triton_path(fc2)})), mon)]
        # monarch_mlp: the hidden layer on chip forward, and in training its backward kernel too
        fused = (cm.mlp_forward(fc1, fc2, dtype, dev) if op == "fwd"
                 else cm.mlp_training_step(fc1, fc2, dtype, dev))
        variants.append(("mlp hidden fused", fused))
        td, tr = dense.time(dev), ref.time(dev)
        for path, cost in variants:
            t = cost.time(dev)
            rows.append(ModelRow(label, T, op, path, round(t * 1e6, 1), round(td * 1e6, 1), round(td / t, 2),
                                 round(tr / t, 2), round(cost.flops / cost.useful_flops, 2),
                                 round(cost.hbm_bytes / 1e6), round(cost.l2_bytes / 1e6), cost.launches,
                                 float("nan"), f">= {want}x dense", "yes" if td / t >= want else "NO"))
    return rows


def model_rows() -> list[ModelRow]:
    cuda = [t for t in TARGETS if _resident_takes(*t[1:6])]
    rows = [_row(*t) for t in TARGETS] + [_row(*t, resident=True) for t in cuda] + mlp_rows()
    fast = ([_row(*t, dev=FAST_L2) for t in TARGETS] + [_row(*t, dev=FAST_L2, resident=True) for t in cuda]
            + mlp_rows(dev=FAST_L2))
    for r, f in zip(rows, fast):
        r.x_dense_fast_l2 = f.x_dense
    return rows


def format_rows(rows: list[ModelRow]) -> str:
    head = ["target", "T", "path", "pred us", "dense us", "x dense", "x torch", "exec/useful", "HBM MB", "L2 MB",
            "launches", "%copyBW", "wanted", "met", "x dense @L2 10TB/s"]
    body = [[r.label, str(r.tokens), r.path, f"{r.us:.1f}", f"{r.dense_us:.1f}", f"{r.x_dense:.2f}",
             f"{r.x_torch:.2f}", f"{r.flop_ratio:.2f}", str(r.hbm_mb), str(r.l2_mb), str(r.launches),
             "-" if r.pct_copy_bw != r.pct_copy_bw else f"{r.pct_copy_bw:.0f}", r.target, r.met,
             f"{r.x_dense_fast_l2:.2f}"] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def model_report(dev=cm.H100_SXM) -> tuple[str, list[dict]]:
    rows = model_rows()
    title = (f"cost model, {dev.name}, bfloat16: HBM {dev.hbm_bw / 1e12:.1f} TB/s x {dev.mem_eff}, L2 "
             f"{dev.l2_bw / 1e12:.1f} TB/s, dense {dev.dense_flops['bfloat16'] / 1e12:.0f} TFLOP/s, launch gap "
             f"{dev.launch_s * 1e6:.0f} us")
    return title + "\n" + format_rows(rows), [asdict(r) for r in rows]
