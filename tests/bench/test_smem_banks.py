"""``python -m bench.smem_banks``: the resident kernels' swizzled 16-bit scatters are conflict-free at the target
shapes (the cost model prices them so), and the count itself sees conflicts where they are."""
from bench import smem_banks


def test_wavefronts_counts_distinct_words_per_bank():
    assert smem_banks.wavefronts(range(64)) == 1           # 32 consecutive words: one each
    assert smem_banks.wavefronts([0, 1]) == 1               # two halves of one word
    assert smem_banks.wavefronts([0, 64, 128, 192]) == 4    # 4 words 32 apart: one bank


def test_target_shapes_are_conflict_free_only_with_the_swizzle(capsys):
    assert smem_banks.one_cta((32,) * 6) == (1, 1) and smem_banks.one_cta((32,) * 6, swizzled=False) == (4, 4)
    assert smem_banks.cluster(64) == 1 and smem_banks.cluster(64, swizzled=False) == 4
    assert all(r["P1 swizzled"] <= r["P1 plain"] and r["P2 swizzled"] <= r["P2 plain"] for r in smem_banks.rows())
    assert smem_banks.main([]) == 0 and "wavefronts" in capsys.readouterr().out
