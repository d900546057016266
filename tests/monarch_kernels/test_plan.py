"""The Triton launch planner (monarch_kernels.triton.plan) on hand-worked shapes: row tiles, warps, block widths,
pipeline depth, weight-gradient tiles and token splits, the fused kernels' applicability. Pure arithmetic, so
these run without Triton; each case states the rule it checks and the numbers it expects."""
from monarch_kernels.shapes import MonarchShape
from monarch_kernels.triton import plan


def test_row_tile_shrinks_to_the_tokens():
    """A row tile is no taller than the token count rounded up to a power of two (at least 16 rows): the
    token-major P1 store of 4096/64 takes 128 rows at 16384 tokens, 64 at 40, 32 at 32, 16 at 16; the fused
    square kernel's 32-row tile (16 blocks of 16) drops to 16 rows at 10 tokens."""
    rows = lambda T: plan.bd_launch(T, 64, 64, 64, 2, None, (64, 64), out_token_major=True).tile.block_m
    assert [rows(T) for T in (16384, 40, 32, 16)] == [128, 64, 32, 16]
    assert plan.fused_tile(4096, 16, 16).block_m == plan.fused_tile(20, 16, 16).block_m == 32
    assert plan.fused_tile(10, 16, 16).block_m == 16


def test_eight_warps_only_for_large_tiles_of_64_rows_or_more():
    """8 warps need a large tile (≥ 8192 elements) and ≥ 64 rows: the grouped P1 store of 4096/64 (8 blocks x 64
    columns) gets 8 warps at 64 rows, 4 at 32 rows although 8 x 32 x 64 = 16384 elements; small tiles 4."""
    tile = lambda T: plan.bd_launch(T, 64, 64, 64, 2, None, (64, 64)).tile
    assert (tile(16384).block_m, tile(16384).group, tile(16384).num_warps) == (64, 8, 8)
    assert (tile(32).block_m, tile(32).block_n, tile(32).group, tile(32).num_warps) == (32, 64, 8, 4)
    assert plan._warps(8 * 32 * 64, 32) == 4 and plan._warps(8 * 64 * 64, 64) == 8 and plan._warps(4096, 128) == 4


def test_saved_pre_activation_at_unaligned_widths_takes_a_smaller_tile_and_eight_warps():
    """A training forward's stage 2 with an activation stores the pre-activation, then activates the whole group
    tile: at unaligned widths (1000 -> 3000 in 4 blocks: 750 x 250, not whole 16-byte vectors) the group's
    pre-activation and its fp32 activation are live together, so 4 x 64 x 64 (4·64·64·6 = 96 KB over the tight
    64 KB budget; 48 B spilled on triton 3.6) becomes 4 x 32 x 64 at 8 warps (40 B spilled at 4). The
    inference forward, and aligned widths (768 x 256) with a saved pre-activation, keep 4 x 64 x 64."""
    tile = lambda q, p, item, save: plan.bd_launch(333, 4, q, p, item, None, (q, 4), True, True, False, save).tile
    t = tile(750, 250, 2, True)
    assert (t.block_m, t.block_n, t.group, t.num_warps) == (32, 64, 4, 8)
    assert t.group * t.block_m * t.block_n * (2 + 4) <= plan.LIVE_BYTES * 2 // 3
    assert (t.block_m, t.block_n, t.num_warps) == (tile(750, 250, 4, True).block_m, 64, 8)  # fp32 alike
    for q, p, save in ((750, 250, False), (768, 256, True), (768, 256, False)):
        u = tile(q, p, 2, save)
        assert (u.block_m, u.block_n, u.group, u.num_warps) == (64, 64, 4, 8), (q, p, save)


def test_few_tokens_with_interleaved_groups_take_narrow_columns():
    """At 16 tokens a group of 8 interleaved blocks takes 32-wide column tiles (16 x 64 x 8 spilled, kernel
    audit); a token-major store (no group) keeps 64."""
    grouped = plan.bd_launch(16, 64, 64, 64, 2, None, (64, 64)).tile
    assert (grouped.block_m, grouped.block_n, grouped.group) == (16, 32, 8)
    plain = plan.bd_launch(16, 64, 64, 64, 2, None, (64, 64), out_token_major=True).tile
    assert (plain.block_m, plain.block_n, plain.group) == (16, 64, 1)


def test_weight_gradient_tile_tie_goes_to_the_wider_p_tile():
    """128 x 128 blocks, one per program: within the 32 KB accumulator 64 x 128 and 128 x 64 both move
    (2 · 1) · (64 + 128) = 384 columns per token; the tie goes to the wider p-tile, 64 x 128."""
    t = plan.wgrad_tile(1, 128, 128, 1)
    assert (t.block_m, t.block_n, t.block_k) == (64, 128, 64)
    grouped = plan.wgrad_tile(4, 64, 64, 4)  # 4 interleaved accumulators: 32 x 32 in 16 KB, a 32-token step
    assert (grouped.block_m, grouped.block_n, grouped.block_k, grouped.group) == (32, 32, 32, 4)


def test_fused_dx_dw1_tile_keeps_half_the_dot_budget_for_its_operands():
    """The fused dx/dw1 kernel holds the fp32 dw1 tile (padded q x p-tile) in half of DOT_BYTES, the W1 and dy
    tiles beside it: q = 192 (GPT-2's fc2) pads to 256, so 256 x 16 x 4 = 16 KB, 16-wide p-tiles and 32 token
    rows; q = 64 keeps 64 x 64 and 64 rows."""
    assert plan.dxw_tile(192, 768) == plan.Tile(32, 16, 256, 1, 4, 3)
    assert plan.dxw_tile(64, 64) == plan.Tile(64, 64, 64, 1, 4, 3)
    lp = plan.dxw_launch(16384, 4, 192, 768, 132)
    assert (lp.tiles, lp.splits, lp.rows_per_split) == (4 * 48, 2, 8192)


def test_token_splits_are_whole_token_steps():
    """1000 tokens, one 64 x 64 weight-gradient tile: about 4 programs per SM would allow 528 splits, at least
    256 tokens each allows 4; each split's rows are rounded up to the 64-token step (256, not 250), so splits
    never overlap and only the last is ragged (232 rows)."""
    lp = plan.wgrad_launch(1000, 1, 64, 64, 2, None, 132)
    assert (lp.tiles, lp.splits, lp.rows_per_split, lp.tile.block_k) == (1, 4, 256, 64)
    lp = plan.wgrad_launch(600, 4, 7, 8, 4, None, 4)
    assert (lp.splits, lp.rows_per_split) == (3, 256)


def test_a_single_k_step_gather_keeps_output_dtype_results():
    """dy of 4096/64 gathers g through P2ᵀ in groups of 8 blocks with a 64-deep contraction: one K step, so the
    results stay in the output dtype (no fp32 accumulators across K steps) and the step stays 64 deep; a
    128-deep gathered contraction takes fp32 accumulators and 32-deep steps."""
    lp = plan.bd_launch(16384, 64, 64, 64, 2, (64, 64), (64, 64), out_token_major=True)
    assert lp.inp.mode == plan.GROUPED and lp.tile.group == 8
    assert lp.tile.block_k == 64 and not lp.multi_k
    deep = plan.bd_launch(16384, 32, 32, 128, 2, (128, 32), (32, 32), out_token_major=True)
    assert deep.inp.mode == plan.GROUPED and deep.tile.block_k == 32 and deep.multi_k


def test_fused_mlp_takes_sixteen_hidden_rows_per_block_pair():
    """The fused MLP needs S = p2 / l1 ≥ 16 hidden rows per (fc2 block, fc1 block): 256 -> 256 -> 256 with 4
    blocks of 64 has exactly 16 (one 16-row chunk); 60-wide fc2 blocks (S = 15) are refused. More rows go in the
    forward's 32-row chunks and the backward's 16-row ones (32 spilled on triton 3.6)."""
    sh = MonarchShape(4, 64, 64, 4, 64, 64)
    assert plan.mlp_fusable(sh, sh, 256, 256, 2) and plan.mlp_block_s(16) == 16 and plan.mlp_block_s(17) == 32
    assert plan.mlp_block_s(16, plan.MLP_BWD_TILE) == plan.mlp_block_s(192, plan.MLP_BWD_TILE) == 16
    assert not plan.mlp_fusable(sh, MonarchShape(4, 64, 60, 4, 60, 64), 256, 256, 2)


def test_paired_launch_takes_the_larger_warps_and_stages():
    """Two grids run as one launch get the larger warp count and the deeper pipeline of the two."""
    a, b = plan.Tile(64, 64, 64, 8, 8, 2), plan.Tile(128, 64, 64, 1, 4, 3)
    assert plan.pair_tile(a, b) == plan.pair_tile(b, a) == plan.Tile(0, 0, 0, 1, 8, 3)
