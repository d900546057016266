"""The fixed list of kernel mutations that the test suite must kill (``make mutants`` runs them).

Each mutant is data: the file, an exact snippet that must occur exactly once in it, its replacement and the
bug it models. When the kernels are rewritten the list is re-targeted by editing snippets here; the runner
refuses a snippet that no longer matches (or matches twice) instead of silently skipping the mutant.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    snippet: str
    replacement: str
    models: str
    #: the tests that must kill it (default: the kernel tests, ``run.kill_tests``)
    tests: tuple = ()

    @property
    def compiled(self) -> bool:
        """Whether the CPU extension must be rebuilt to run this mutant (CUDA sources are not in it: their
        mutants are killed by the tests that build them, e.g. the CPU emulation of ``tests/cuda_sim``)."""
        return self.path.startswith("csrc/") and not self.path.startswith("csrc/cuda/")


TRITON_BD = "monarch_kernels/triton/blockdiag.py"
TRITON_MON = "monarch_kernels/triton/monarch.py"
CPU = "csrc/monarch_cpu.cpp"
ROWSPLIT = "csrc/cuda/decode_rowsplit.cuh"
ROWSPLIT_SIM = ("tests/csrc/test_cuda_rowsplit_sim.py",)
RESIDENT = "csrc/cuda/resident.cuh"
RESIDENT_SIM = ("tests/csrc/test_cuda_resident_sim.py",)

MUTANTS = [
    # ---------------------------------------------------------------------------------------- Triton
    Mutant("triton-drop-last-k-chunk", TRITON_BD,
           "    for k0 in range(0, P, BLOCK_K):\n        kidx = k0 + rk",
           "    for k0 in range(0, P - 1, BLOCK_K):\n        kidx = k0 + rk",
           "the K loop of the block-diagonal forward skips its last chunk (visible at p = 1)"),
    Mutant("triton-gathered-drop-last-k-chunk", TRITON_BD,
           "        for k0 in range(0, P, BLOCK_K):\n            a = _gathered_tile(",
           "        for k0 in range(0, P - BLOCK_K, BLOCK_K):\n            a = _gathered_tile(",
           "the multi-K loop over a gathered (P2ᵀ) input skips its last chunk"),
    Mutant("triton-overlapping-split", TRITON_BD,
           "    for t0 in range(0, ROWS_PER_SPLIT, BLOCK_K):",
           "    for t0 in range(0, ROWS_PER_SPLIT + BLOCK_K, BLOCK_K):",
           "split-T weight gradient: a split also reads the first rows of the next split (counted twice)"),
    Mutant("triton-first-split-only", TRITON_BD,
           "    return partial.sum(0).to(x.dtype)",
           "    return partial[0].to(x.dtype)",
           "split-T weight gradient: only the first split's partial sum is returned"),
    Mutant("triton-dxw-first-split-only", TRITON_MON,
           "part1.sum(0).to(w1.dtype)",
           "part1[0].to(w1.dtype)",
           "fused dx/dw1 kernel: only the first token split's dw1 partial is returned"),
    Mutant("triton-separate-dx-untransposed-w1", TRITON_MON,
           "        return bd_forward(dy, w1.transpose(1, 2), None, n_in), bd_weight_grad(",
           "        return bd_forward(dy, w1, None, n_in), bd_weight_grad(",
           "the two-kernel dx/dw1 backward multiplies dy by W1 instead of W1ᵀ (same shape when q = p)"),
    Mutant("triton-token-major-stride-rounds-down", "monarch_kernels/triton/_common.py",
           "    ld = -(-max(tokens, 1) // 16) * 16",
           "    ld = max(16, max(tokens, 1) // 16 * 16)",
           "the token-major intermediate's column stride rounded down: with a ragged token count the columns "
           "overlap and later columns overwrite the last tokens of earlier ones"),
    Mutant("triton-pre-activation-stored-activated", TRITON_BD,
           "        tl.store(PRE + rm[:, None] * syt + col[None, :] * syf, out, mask=m_ok[:, None] & ok[None, :])\n"
           "        out = _activation(out.to(tl.float32), ACT).to(Y.dtype.element_ty)",
           "        out = _activation(out.to(tl.float32), ACT).to(Y.dtype.element_ty)\n"
           "        tl.store(PRE + rm[:, None] * syt + col[None, :] * syf, out, mask=m_ok[:, None] & ok[None, :])",
           "the kept pre-activation is stored after the activation: the backward differentiates at act(pre)"),
    Mutant("triton-kept-z-overwrites-one-chunk", TRITON_MON,
           "zc = z[t0:t1] if keep else",
           "zc = z[: t1 - t0] if keep else",
           "a training forward keeps the intermediate but writes every chunk into the first chunk's rows"),
    Mutant("triton-fused-kept-z-without-group-offset", TRITON_MON,
           "        zc = ll0 * K + tl.arange(0, GROUP * K)",
           "        zc = tl.arange(0, GROUP * K)",
           "the fused kernel's kept intermediate: every stage-2 group writes the first group's columns"),
    Mutant("triton-paired-stages-share-one-buffer", TRITON_MON,
           "buffers = 1 if keep or chunk >= T else (2 if pair else 1)",
           "buffers = 1",
           "paired launches write stage 1 of a chunk into the buffer stage 2 of the previous chunk still reads"),
    Mutant("triton-token-major-copy-drops-last-tile", "monarch_kernels/triton/token_major.py",
           "    ok = (rt < T)[:, None] & (rn < N)[None, :]\n    v = tl.load(",
           "    ok = (rt < T - 1)[:, None] & (rn < N)[None, :]\n    v = tl.load(",
           "the token-major copy of g leaves its last token unwritten (a ragged last tile mis-masked)"),
    Mutant("triton-activation-grad-relu-kink", "monarch_kernels/triton/token_major.py",
           "        d = tl.where(x <= 0.0, 0.0, g)",
           "        d = tl.where(x < 0.0, 0.0, g)",
           "the token-major ReLU derivative passes g at pre = 0 (torch's threshold_backward gives 0 there)"),
    Mutant("triton-ragged-input-unmasked", TRITON_BD,
           "m_ok[:, None] & ((kidx < P) & (col < N_IN))[None, :]",
           "m_ok[:, None] & (kidx < P)[None, :]",
           "a ragged input (n_in < k·p) reads past the end of its row instead of zero padding"),
    Mutant("triton-fused-p2-store", TRITON_MON,
           "        col = (idx // GROUP) * L + ll0 + idx % GROUP",
           "        col = (ll0 + idx % GROUP) * S + idx // GROUP",
           "fused forward stores block-major instead of through the permutation P2"),
    Mutant("triton-fused-bias-unpermuted", TRITON_MON,
           "            col = rs * L + LL\n",
           "            col = LL * S + rs\n",
           "fused forward adds the bias in block order instead of output order"),
    Mutant("triton-two-kernel-p1", TRITON_MON,
           "        return dict(x=x[t0:t1], w=w1, out_perm=(sh.l, sh.r), out=zc)",
           "        return dict(x=x[t0:t1], w=w1, out_perm=(sh.r, sh.l), out=zc)",
           "two-kernel forward (separate launches) applies the transpose of P1"),
    Mutant("triton-chain-p1", TRITON_MON,
           "        bd_forward_chain(dict(x=x, w=w1, out_perm=(sh.l, sh.r), out=z),",
           "        bd_forward_chain(dict(x=x, w=w1, out_perm=(sh.r, sh.l), out=z),",
           "the chained (one-launch) two-kernel forward applies the transpose of P1"),
    Mutant("triton-chain-stage1-signals-wrong-chunk", TRITON_BD,
           "        _signal(COUNTERS + 1 + c1)",
           "        _signal(COUNTERS + 1 + c)",
           "a chained stage-1 tile counts itself done for the chunk before its own: stage 2 of its chunk could start "
           "before it finished (a race on a GPU)"),
    Mutant("triton-bmm-dy-natural-blocks", TRITON_MON,
           "torch.bmm(g.unflatten(1, (sh.s, sh.l)).permute(2, 0, 1), w2, out=",
           "torch.bmm(g.unflatten(1, (sh.l, sh.s)).permute(1, 0, 2), w2, out=",
           "the cuBLAS dy reads g's blocks as contiguous column ranges instead of through P2ᵀ"),
    Mutant("triton-bmm-dw2-z-in-p1-order", TRITON_MON,
           "z.unflatten(1, (sh.l, sh.r)).permute(1, 0, 2)",
           "z.unflatten(1, (sh.r, sh.l)).permute(2, 0, 1)",
           "the cuBLAS dw2 reads the intermediate in stage-1 (P1) order instead of stage-2 order"),
    Mutant("triton-chain-stage2-reads-first-slot", TRITON_BD,
           "X2 + (c % BUFFERS) * CHUNK * sxt2",
           "X2 + (c % 1) * CHUNK * sxt2",
           "chained stage 2 reads every chunk's intermediate from the first slot"),
    Mutant("triton-fused-dx-store-unmasked", TRITON_MON,
           "dx.to(DX.dtype.element_ty), mask=t_ok[:, None] & x_ok[None, :])",
           "dx.to(DX.dtype.element_ty), mask=t_ok[:, None] & (rp < P)[None, :])",
           "fused dX writes the padded columns past n_in into the next row"),
    Mutant("triton-relu-drops-nan", TRITON_BD,
           "        v = tl.where(v < 0.0, 0.0, v)",
           "        v = tl.maximum(v, 0.0)",
           "fused ReLU maps NaN to 0 (defect D2)"),
    Mutant("triton-pre-activation-unrounded", TRITON_BD,
           "        v = _activation(v.to(ODTYPE).to(tl.float32), ACT)",
           "        v = _activation(v, ACT)",
           "the epilogue activates the fp32 pre-activation, not its output-dtype rounding as act(F.linear(...))"),
    Mutant("triton-dy-gathered-tile-held-back", "monarch_kernels/triton/plan.py",
           "tight=activation or (inp.mode == GROUPED and (itemsize > 2 or (out.mode == GROUPED",
           "tight=activation or (inp.mode == GROUPED and (itemsize > 0 or (out.mode == GROUPED",
           "dy's 16-bit gathered input held to two thirds of the register budget: g re-read from L2 per half tile"),
    Mutant("triton-token-major-stage2-skips-copy", TRITON_MON,
           "        copy_into(yt, out)\n",
           "        yt.add_(0)\n",
           "the token-major stage 2's result never reaches the row-major output (the transposing copy is dropped)"),
    Mutant("triton-copy-into-swapped-source-strides", "monarch_kernels/triton/token_major.py",
           "_token_major_copy_kernel[grid](src, out, T, n, *src.stride(), *out.stride(), **meta)",
           "_token_major_copy_kernel[grid](src, out, T, n, *src.stride()[::-1], *out.stride(), **meta)",
           "copy_into reads its source with the token and feature strides swapped"),
    Mutant("plan-memo-ignores-settings", "monarch_kernels/triton/plan.py",
           "        key = (args, tuple(sorted(kwargs.items())), tuple(g[name] for name in _SETTINGS))",
           "        key = (args, tuple(sorted(kwargs.items())))",
           "memoised plans ignore the module's settings: a patched budget or flag returns a stale plan"),
    Mutant("cost-token-major-store-copy-free", "monarch_kernels/cost_model.py",
           "        return Cost([k for pair_ in zip(first, second) for k in pair_] + (copy if token_major else []))",
           "        return Cost([k for pair_ in zip(first, second) for k in pair_])",
           "the model prices the token-major stage 2 without its transposing copy"),
    # ---------------------------------------------------------------------------------------- ops, models
    Mutant("ops-output-is-a-view", "monarch_kernels/ops.py",
           "    return out.detach() if out._is_view() else out",
           "    return out",
           "a recorded call returns a view of the kernel's buffer: nn.ReLU(inplace=True) after the layer raises"),
    Mutant("cuda-cost-barrier-in-series", "monarch_kernels/cuda_cost.py",
           "            critical, latency = first, L2_LATENCY_S",
           "            critical, latency = 0.0, GRID_SYNC_S + L2_LATENCY_S",
           "the decode model adds the grid barrier after the whole stream, as if stage 2's prefetch delayed stage 1"),
    # ---------------------------------------------------------------------------------------- C++ CPU
    Mutant("cpu-relu-drops-nan", CPU,
           "      for (int64_t j = 0; j < n; ++j) row[j] = row[j] < acc_t(0) ? acc_t(0) : row[j];  // NaN stays NaN",
           "      for (int64_t j = 0; j < n; ++j) row[j] = row[j] > acc_t(0) ? row[j] : acc_t(0);",
           "fused ReLU maps NaN to 0 (defect D2)"),

    Mutant("cpu-gelu-tanh-as-erf", CPU,
           'inline c10::string_view gelu_approximation(int64_t act) { return act == GELU_TANH ? "tanh" : "none"; }',
           'inline c10::string_view gelu_approximation(int64_t act) { return "none"; }',
           "the tanh-GELU epilogue computes the erf GELU (wrong approximation passed on)"),

    Mutant("cpu-bias-short-copy", CPU,
           "    std::copy(src, src + std::min<int64_t>(n, b.numel()), out.begin());",
           "    std::copy(src, src + std::min<int64_t>(n, b.numel()) - 1, out.begin());",
           "the last bias entry is dropped"),

    Mutant("cpu-p1-skipped", CPU,
           "        transpose_rows(m, d.r, d.l, A, nm, B, nm);  // Z = P1 Y in B",
           "        transpose_rows(m, 1, nm, A, nm, B, nm);  // Z = P1 Y in B",
           "the row-tiled forward skips the permutation P1 (stage 2 reads the stage-1 outputs unpermuted)"),

    Mutant("cpu-micro-edge-short-k", CPU,
           "    for (int64_t kk = 0; kk < K; ++kk) {\n      const T a = A[r * lda + kk];",
           "    for (int64_t kk = 0; kk + 1 < K; ++kk) {\n      const T a = A[r * lda + kk];",
           "the portable edge micro-kernel drops the last term of the contraction"),

    Mutant("cpu-dot-tail-unmasked", CPU,
           "    const __mmask16 mk = mask16(K - k);",
           "    const __mmask16 mk = __mmask16(0xFFFF);",
           "AVX-512 dot-product kernel reads past K in its last vector (no tail mask)"),

    Mutant("cpu-wgrad-chunk-drops-last-tile", CPU,
           "        for (int64_t tile = ch * ntiles / nch; tile < (ch + 1) * ntiles / nch; ++tile) {\n          const int64_t t0 = tile * tm",
           "        for (int64_t tile = ch * ntiles / nch; tile + 1 < (ch + 1) * ntiles / nch; ++tile) {\n          const int64_t t0 = tile * tm",
           "Monarch weight gradient: each token chunk skips its last row tile"),

    Mutant("cpu-reduce-skips-last-part", CPU,
           "      for (size_t c = 1; c < parts.size(); ++c) sum += parts[c][i];",
           "      for (size_t c = 1; c + 1 < parts.size(); ++c) sum += parts[c][i];",
           "the deterministic reduction of per-chunk weight-gradient partials drops the last chunk"),

    Mutant("cpu-dx-ragged-unclamped", CPU,
           "        const int64_t lim = std::min(d.p, n_in - kk * d.p);\n        if (lim > 0) store_rows(dxb",
           "        const int64_t lim = d.p;\n        if (lim > 0) store_rows(dxb",
           "dX writes the padded columns past n_in into the next row (and past the end of the buffer)"),
    Mutant("cpu-pre-activation-unrounded", CPU,
           "        for (int64_t j = 0; j < n; ++j) row[j] = static_cast<acc_t>(static_cast<scalar_t>(row[j]));",
           "        for (int64_t j = 0; j < n; ++j) row[j] = row[j];",
           "fp16/bf16 epilogues activate the fp32 pre-activation, not the stored one (fp16 overflow: no NaN from gelu)"),
    Mutant("cpu-act-backward-drops-bias", CPU,
           "act_backward_rows<scalar_t, acc_t>(gbuf, no, P, no, m, n_out, bias, act);",
           "act_backward_rows<scalar_t, acc_t>(gbuf, no, P, no, m, n_out, nullptr, act);",
           "the one-pass backward with an activation differentiates at the pre-activation without the bias"),

    # ---------------------------------------------------------------------------------------- CUDA (CPU emulation)
    Mutant("cuda-sim-rowsplit-p1-transposed", ROWSPLIT,
           "      const int f = rr * P.l + ll, kk = f / P.q;",
           "      const int f = ll * P.r + rr, kk = f / P.q;",
           "the general stage 1 of the row-split forward reads w1 rows in the transposed P1 order", ROWSPLIT_SIM),
    Mutant("cuda-sim-rowsplit-short-reduction", ROWSPLIT,
           "    for (int off = lanes >> 1; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);",
           "    for (int off = lanes >> 2; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);",
           "the lane-group sum stops one xor step short (half of a row's chunks dropped)", ROWSPLIT_SIM),
    Mutant("cuda-sim-rowsplit-unclamped-rows", ROWSPLIT,
           "      wrow[j] = w2 + static_cast<int64_t>(ss < s1 ? ss : s0) * P.r;",
           "      wrow[j] = w2 + static_cast<int64_t>(ss) * P.r;",
           "stage 2 loads rows past its CTA's share (past the end of w2 for the last one)", ROWSPLIT_SIM),
    Mutant("cuda-sim-rowsplit-vector-x-row", ROWSPLIT,
           "      xrow[j] = x + (f / P.q) * P.p;",
           "      xrow[j] = x + (f % P.k) * P.p;",
           "the vector stage 1 dots a w1 row with the wrong block of x", ROWSPLIT_SIM),
    Mutant("cuda-sim-resident-stale-a-fragments", RESIDENT,
           "      if (b != block) {",
           "      if (block < 0) {",
           "a warp keeps the A fragments of its first block for the next blocks (no reload on a block change)",
           RESIDENT_SIM),
    Mutant("cuda-sim-resident-p1-unwrapped", RESIDENT,
           "          if (lo >= P.l) lo -= P.l, ++hi;  // lo0 < l and j ≤ 1",
           "          (void)0;",
           "P1's position of an odd column that crosses a multiple of l is not wrapped to the next row", RESIDENT_SIM),
    Mutant("cuda-sim-resident-tail-rows-stored", RESIDENT,
           "      if (t0 + row < P.tokens)\n",
           "      if (t0 + row < P.tokens + kResidentRows)\n",
           "the last tile's rows past the tokens are stored (past the end of the output)", RESIDENT_SIM),
    Mutant("cuda-sim-resident-single-buffer", RESIDENT,
           "    T* const cur = smem + (it & 1) * buf_elems;",
           "    T* const cur = smem;",
           "every tile is read from the first buffer while the second is filled (double buffer broken)",
           RESIDENT_SIM),
]
