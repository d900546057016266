"""Shared-memory bank conflicts of the resident kernels' 16-bit scatters, counted from their index formulas.

``python -m bench.smem_banks`` replays, for each warp-wide 16-bit store of the P1 scatter (stage 1's results
into the intermediate) and the P2 scatter (stage 2's into the output rows) of ``csrc/cuda/resident.cuh``, and of
the staging and output scatters of ``csrc/cuda/cluster_resident.cuh``, the 32 lanes' shared-memory addresses
(this module mirrors the kernels' index arithmetic, with and without their swizzle) and prints the worst number
of wavefronts: the most distinct 4-byte words any one of the 32 banks must serve (1 = conflict-free). The cost
model (``monarch_kernels.cuda_cost``) prices these scatters as conflict-free; this is where that is checked.
"""
from __future__ import annotations

import argparse
import sys

#: (k, q, p, l, s, r) of the one-CTA kernel's table: 1024/32, 1024/64, 768/24, and small/rectangular cases
ONE_CTA_SHAPES = [(32, 32, 32, 32, 32, 32), (64, 16, 16, 64, 16, 16), (24, 32, 32, 24, 32, 32),
                  (8, 16, 16, 8, 16, 16), (4, 32, 16, 8, 16, 16), (4, 16, 16, 4, 16, 16)]
CLUSTER_BLOCKS = (16, 32, 64)


def wavefronts(addresses) -> int:
    """Wavefronts of one warp-wide access to 16-bit elements at ``addresses``: per bank, the distinct words."""
    banks: dict[int, set] = {}
    for a in addresses:
        banks.setdefault((a // 2) % 32, set()).add(a // 2)
    return max(len(words) for words in banks.values())


def _pitch(n_in: int, mid: int, n_out: int) -> int:  # resident.cuh: resident_pitch
    return -(-max(n_in, mid, n_out) // 16) * 16 + 8


def one_cta(shape: tuple, swizzled: bool = True) -> tuple[int, int]:
    """Worst wavefronts of the one-CTA kernel's P1 and P2 scatters (``resident_kernel``)."""
    k, q, p, l, s, r = shape
    pitch = _pitch(k * p, k * q, l * s)
    p1 = p2 = 0
    for u in range(k * q // 8):  # stage-1 8-column tiles; every lane's pair j, rows g and g + 8
        for j in range(2):
            for half in range(2):
                addrs = []
                for lane in range(32):
                    g, c = lane >> 2, lane & 3
                    f0 = 8 * u + 2 * c
                    hi, lo = f0 // l, f0 % l + j
                    if lo >= l:
                        lo, hi = lo - l, hi + 1
                    pos = lo * r + hi
                    if swizzled:
                        pos ^= ((lo >> 1) & 3) << 1
                    addrs.append((g + 8 * half) * pitch + pos)
                p1 = max(p1, wavefronts(addrs))
    for u in range(l * s // 8):
        for j in range(2):
            for half in range(2):
                addrs = []
                for lane in range(32):
                    g, c = lane >> 2, lane & 3
                    ll = 8 * u // s
                    ss = 8 * u - ll * s + 2 * c + j
                    col = ss * l + ll
                    if swizzled and l % 8 == 0:
                        col ^= ((ss >> 1) & 3) << 1
                    addrs.append((g + 8 * half) * pitch + col)
                p2 = max(p2, wavefronts(addrs))
    return p1, p2


def cluster(nb: int, swizzled: bool = True) -> int:
    """Worst wavefronts of the cluster kernel's staging (and, the same formula, output) scatter."""
    pitch = 8 * nb + 8
    worst = 0
    for warp in range(8):
        for nt in range(nb // 8):
            for j in range(2):
                for half in range(2):
                    addrs = []
                    for lane in range(32):
                        g, c = lane >> 2, lane & 3
                        kl = warp ^ (c << 1) if swizzled else warp  # key (qq >> 1) & 3 = c
                        addrs.append((g + 8 * half) * pitch + (8 * nt + 2 * c + j) * 8 + kl)
                    worst = max(worst, wavefronts(addrs))
    return worst


def rows() -> list[dict]:
    out = []
    for shape in ONE_CTA_SHAPES:
        (p1, p2), (q1, q2) = one_cta(shape, swizzled=False), one_cta(shape)
        out.append({"kernel": "one CTA", "shape": "x".join(map(str, shape)), "P1 plain": p1, "P1 swizzled": q1,
                    "P2 plain": p2, "P2 swizzled": q2})
    for nb in CLUSTER_BLOCKS:
        out.append({"kernel": "cluster", "shape": f"{nb} blocks", "P1 plain": cluster(nb, False),
                    "P1 swizzled": cluster(nb), "P2 plain": cluster(nb, False), "P2 swizzled": cluster(nb)})
    return out


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m bench.smem_banks", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from .cuda_decode import format_rows

    print(format_rows(rows(), "worst wavefronts per warp-wide 16-bit store (1 = no bank conflict)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
