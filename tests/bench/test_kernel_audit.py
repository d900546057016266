"""The kernel audit: its PTX/SASS readers on hand-written inputs, and (CI) the default bf16 configuration of every
Triton kernel family compiled for sm_90 without a GPU, checked for what SPEC §5 asks: it compiles, 16-bit
configurations do not spill, every kernel issues tensor-core instructions, and every operand a Monarch
permutation goes through moves ≥ 16 contiguous bytes per thread per access.
"""
import json
import os
import subprocess
import sys

import pytest

from bench.kernel_audit import ptx, sass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.u64 	%rd1, [k_param_0];
	ld.param.u64 	%rd2, [k_param_1];
	ld.param.u32 	%r1, [k_param_2];
	mov.u32 	%r2, %tid.x;
	mul.lo.s32 	%r3, %r2, %r1;
	mad.wide.s32 	%rd3, %r3, 2, %rd1;
	mad.wide.s32 	%rd4, %r2, 16, %rd2;
	@%p1 ld.global.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd3 + 0 ];
	add.s32 	%r8, %r4, %r5;
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 0x10, %r10;
	st.global.b16 	[%rd4+2], %rs1;
	@%p2 st.global.v4.b32 [ %rd4 + 0 ], { %r8, %r5, %r6, %r7 };
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
}
"""


def test_ptx_names_the_operand_and_width_of_every_access():
    s = ptx.analyse(PTX)
    assert s.pointer_params == [0, 1]
    assert s.tensor_core == "mma"
    widths = s.widths()
    assert widths[0] == {"load": (16, 16)}  # v4.b32 load and a 16-byte cp.async from param 0
    assert widths[1] == {"store": (2, 16)}  # a 2-byte and a 16-byte store through param 1
    # a value loaded from memory is data, not an address: the store's data operand carries no taint
    assert all(a.params for a in s.accesses)


def test_sass_widths():
    assert sass._ldst_bytes(".E.128") == 16
    assert sass._ldst_bytes(".E.64") == 8
    assert sass._ldst_bytes(".E.U16") == 2
    assert sass._ldst_bytes(".E") == 4


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def ci_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    probe = subprocess.run([sys.executable, "-c", "from bench.kernel_audit.offline import offline_target_problem as p;"
                            "print(p() or '')"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    if probe.returncode != 0 or probe.stdout.strip():
        pytest.skip(f"the installed triton cannot target CUDA offline: {(probe.stdout + probe.stderr).strip()[-300:]}")
    res = subprocess.run([sys.executable, "-m", "bench.kernel_audit", "--parts", "triton", "--scope", "ci",
                          "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "audit.json").read_text())["rows"]


def permuted_operands(row: dict) -> set:
    """The operands a row's kernel reads or writes through a Monarch permutation (from its configuration)."""
    cfg, name = row["config"], row["kernel"]
    if name == "_fused_fwd_kernel":  # P2 folded into the store; a kept intermediate goes out in P1 order
        return {"OUT", "Z"} if "KEEP_Z=1" in cfg else {"OUT"}
    if name in ("_bd_fwd_kernel", "_bd_pair_kernel", "_bd_chain_kernel"):
        # the pre-activation (SAVE_PRE) goes through the output's permuted store; the pair and chain kernels
        # have a second call's operands with the suffix 2
        ops = set()
        for sfx in ("", "2") if name != "_bd_fwd_kernel" else ("",):
            mine = {op + sfx for op, flag in (("X", "IN_MODE"), ("Y", "OUT_MODE")) if f"{flag}{sfx}=1" in cfg}
            ops |= mine | ({"PRE" + sfx} if "Y" + sfx in mine and f"SAVE_PRE{sfx}=1" in cfg else set())
        return ops
    if name == "_bd_wgrad_kernel":
        return {"G_"} if "G_MODE=1" in cfg else set()
    if name == "_hidden_kernel":  # the fused MLP stores fc2's stage-1 output through P1
        return {"Z2"}
    return set()


#: the kernels without a matmul: the token-major copy of g and the activation derivative written token-major
#: (GPT-2-like backward)
COPY, ACT_GRAD = "_token_major_copy_kernel", "_activation_grad_kernel"
#: the kernels that sum over tokens (a split's whole token steps, then its ragged last one)
TOKEN_SUMS = ("_bd_wgrad_kernel", "_dxw_kernel")


def test_ci_configs_compile_for_sm90(ci_audit):
    names = {r["kernel"] for r in ci_audit}
    assert {"_bd_fwd_kernel", "_bd_pair_kernel", "_bd_chain_kernel", "_dxw_kernel", "_bd_wgrad_kernel",
            "_fused_fwd_kernel", "_hidden_kernel", COPY, ACT_GRAD} <= names
    assert all(not r["error"] for r in ci_audit), [r["error"] for r in ci_audit if r["error"]]


def test_ci_configs_no_spills_and_tensor_cores(ci_audit):
    for r in ci_audit:
        assert r["spill_bytes"] == 0, (r["kernel"], r["config"], r["spill_bytes"])
        if r["kernel"] not in (COPY, ACT_GRAD):
            assert r["tensor_core"] in ("wgmma", "mma"), (r["kernel"], r["config"])


def test_ci_fused_mlp_hidden_layer_on_wgmma_with_16_byte_accesses(ci_audit):
    """The GPT-2 MLP's fused hidden layer (two chained dots per chunk): wgmma, no spills (checked above), the
    activations (z1 in, z2 out through P1) and fc2's weights in 16-byte vectors; fc1's weight tile (64 deep x 32
    rows) spread over 16 warps leaves each thread 4 elements, 8 bytes (a warp still reads two whole 128-byte
    rows); fc1's bias, indexed through P2, is gathered 2 bytes at a time (a small vector, once per chunk)."""
    rows = [r for r in ci_audit if r["kernel"] == "_hidden_kernel"]
    assert rows and all(r["tensor_core"] == "wgmma" for r in rows), rows
    for r in rows:
        assert {k: v for k, v in r["loads"].items() if k != "B1"} == {"Z1": "16", "W2A": "8", "W1B": "16"}, r
        assert r["stores"] == {"Z2": "16"}, r


def test_ci_fused_mlp_backward_stores_only_what_trains(ci_audit):
    """The GPT-2 MLP's hidden-layer backward kernel in its four variants (every factor trained; fc1's w2 and / or
    fc2's w1 frozen): wgmma, ``a`` stored only for fc2's ``dw1`` and ``dpre`` only for fc1's ``dw2`` (the
    compiled kernel has no such store otherwise), the stores it keeps in 16-byte vectors (the bias partials: a
    float per lane); ``z1`` and ``dy2`` loaded in 16-byte vectors, the weights' 16-row chunks in 8-byte ones. Its
    registers stay at most 216 here: the GPU machines' triton 3.6 takes about 40 more for this kernel, and the
    32-row chunks it had (233 on 3.9) spilled there (bench/RESULTS.md §7g)."""
    rows = [r for r in ci_audit if r["kernel"] == "_hidden_bwd_kernel"]
    flags = {("STORE_A=1" in r["config"], "STORE_DPRE=1" in r["config"]) for r in rows}
    assert flags == {(True, True), (True, False), (False, True), (False, False)}, flags
    for r in rows:
        store_a, store_dpre = "STORE_A=1" in r["config"], "STORE_DPRE=1" in r["config"]
        assert r["tensor_core"] == "wgmma" and r["registers"] <= 216, r
        assert {k: v for k, v in r["loads"].items() if k != "B1"} == {"Z1": "16", "DY2": "16", "W2A": "8",
                                                                      "W1B": "8"}, r
        assert r["stores"] == {"DZ1": "16", "DB1": "4", **({"A": "16"} if store_a else {}),
                               **({"DPRE": "16"} if store_dpre else {})}, r


def test_ci_token_major_copy_moves_16_bytes_each_way(ci_audit):
    """Row-major load along the features, token-major store along the tokens: both 16-byte vectors (the
    compiler converts the register layout through shared memory). The bias gradient's fp32 column sums
    (``PART``, behind a runtime flag: one compile for layers with and without a bias) go out as one 256-byte row
    per program, a float per lane."""
    rows = [r for r in ci_audit if r["kernel"] == COPY]
    assert rows and all(r["loads"] == {"X": "16"} and r["stores"] == {"Y": "16", "PART": "4"} for r in rows), rows
    # the same for g·act'(pre): both inputs row-major, the result token-major
    rows = [r for r in ci_audit if r["kernel"] == ACT_GRAD]
    assert rows and all(r["loads"] == {"PRE": "16", "G": "16"} and r["stores"] == {"Y": "16", "PART": "4"}
                        for r in rows), rows


def test_ci_ragged_token_count_keeps_16_byte_token_major_accesses(ci_audit):
    """At 1000 tokens (not a multiple of 16) every kernel of a training step (forward, backward, the fused MLP's
    both ways) moves its activations in 16-byte vectors, as at 16384: a token-major buffer is loaded and stored
    up to its 16-row padding (``_common.touch_rows``). Bounded by the token count itself, the row mask was not
    provably constant over a vector and all those accesses (the intermediate ``z``, ``dy``, the copies of ``g``,
    the fused MLP's tensors) compiled to 2-byte ones, and the MLP kernel took a 24-byte stack frame. The two
    sums over tokens (``dw``, ``dx + dw1``) load their whole token steps unmasked, in 16-byte vectors, and only
    a split's ragged last step element by element (widths ``2-16``); the small vectors indexed through a
    permutation (the biases, ``B1``) are gathered element by element."""
    rows = [r for r in ci_audit if any("T=1000 " in c for c in r["cases"])]
    names = {r["kernel"] for r in rows}
    assert {"_bd_fwd_kernel", "_bd_wgrad_kernel", "_hidden_kernel", "_hidden_bwd_kernel", COPY} <= names, names
    for r in rows:
        for kind in ("loads", "stores"):
            narrow = {op: w for op, w in r[kind].items() if w == "2" and op not in ("BIAS", "B1")}
            assert not narrow, (r["kernel"], r["config"], kind, r[kind])


def test_ci_permuted_accesses_are_16_bytes(ci_audit):
    """Every access through a Monarch permutation is 16 bytes wide; at a ragged token count, a sum over tokens'
    last step goes element by element after its 16-byte main loop (``2-16``, the test above)."""
    checked = 0
    for r in ci_audit:
        ragged = r["kernel"] in TOKEN_SUMS and all("T=1000 " in c for c in r["cases"])
        for operand in permuted_operands(r):
            for kind in ("loads", "stores"):
                if operand in r[kind]:
                    assert r[kind][operand] in ("16", "tma") + (("2-16",) if ragged else ()), (
                        r["kernel"], r["config"], kind, operand, r[kind])
                    checked += 1
    assert checked >= 5  # P1 and P2 stores, the P2ᵀ gather and P1ᵀ store of dy, the gathered g of dw2, fused P2


CHAIN_PTX_PROBE = r"""
import re, sys, torch
import monarch_kernels as mk
from monarch_kernels.triton import monarch as tmon, plan
from bench.kernel_audit.offline import compile_only
from bench.kernel_audit.triton_part import h100_host
plan.CHUNK_IN_L2 = True  # the chunked schedule (off by default) is the one that chains
sh = mk.monarch_factor_shapes(4096, 4096, 64)
meta = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")
seen = []
with h100_host(), compile_only(on_launch=seen.append):
    tmon.forward(meta(4096, 4096), meta(*sh.w1_shape), meta(*sh.w2_shape), None, 4096)
ptx = [r.kernel.asm["ptx"] for r in seen if r.fn_name.endswith("_bd_chain_kernel")][0]
count = lambda pat: len(re.findall(pat, ptx))
print(count(r"atom\.global\.gpu\.relaxed\.add"), count(r"ld\.volatile\.global"),
      count(r"ld\.global\.gpu\.acquire|atom\.global\.gpu\.acquire"),
      count(r"(red|atom)\.global\.gpu\.release\.add"), count(r"bar\.sync"))
"""


def test_chained_forward_orders_its_memory_accesses():
    """The one-launch forward's waits and signals survive compilation for sm_90 (triton 3.6 once dropped an
    acquire whose result was unused): one relaxed ticket add; per wait a volatile spin and an acquire; per
    finished tile a release add; barriers around them."""
    probe = subprocess.run([sys.executable, "-c", "from bench.kernel_audit.offline import offline_target_problem as p;"
                            "print(p() or '')"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    if probe.returncode != 0 or probe.stdout.strip():
        pytest.skip(f"the installed triton cannot target CUDA offline: {(probe.stdout + probe.stderr).strip()[-300:]}")
    res = subprocess.run([sys.executable, "-c", CHAIN_PTX_PROBE], capture_output=True, text=True, env=_env(),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ticket, spins, acquires, releases, barriers = map(int, res.stdout.split()[-5:])
    assert (ticket, spins, acquires, releases) == (1, 2, 2, 2), res.stdout
    assert barriers >= 4
