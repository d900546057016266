"""One-way pAUC (McClish-standardised, as scikit-learn) and two-way pAUC (as LibAUC's ``pauc_roc_score``)."""
from __future__ import annotations

import numpy as np
from torch import Tensor



def _as_numpy(y_true, y_score):
    y = np.asarray(y_true.detach().cpu() if isinstance(y_true, Tensor) else y_true).reshape(-1)
    s = np.asarray(y_score.detach().cpu().double() if isinstance(y_score, Tensor) else y_score,
                   dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {y.shape} and {s.shape}")
    pos = y == 1
    if not np.all(pos | (y == 0)):
        raise ValueError("y_true must be binary (0/1)")
    if pos.all() or not pos.any():
        raise ValueError("y_true needs both classes")
    return pos, s


def _roc(pos: np.ndarray, s: np.ndarray):
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(pos)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def one_way_pauc(y_true, y_score, max_fpr: float = 0.3, standardized: bool = True) -> float:
    """Area under the ROC curve for FPR ∈ [0, max_fpr] (linear interpolation at ``max_fpr``), McClish-standardised
    to ``½(1 + (A − max_fpr²/2)/(max_fpr − max_fpr²/2))`` (0.5 for a random scorer, 1 for a perfect one) as
    ``sklearn.metrics.roc_auc_score(max_fpr=...)``; ``standardized=False`` returns the raw area ``A``."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    pos, s = _as_numpy(y_true, y_score)
    fpr, tpr = _roc(pos, s)
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x, y = fpr[:stop], tpr[:stop]
    if stop < len(fpr):
        y_interp = np.interp(max_fpr, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_interp]
    area = float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))
    if not standardized or max_fpr == 1:
        return area
    lo, hi = 0.5 * max_fpr ** 2, max_fpr
    return 0.5 * (1 + (area - lo) / (hi - lo))


def _mann_whitney(sp: np.ndarray, sn: np.ndarray) -> float:
    allv = np.r_[sp, sn]
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks of ties
    srt = allv[order]
    bounds = np.r_[0, np.nonzero(np.diff(srt))[0] + 1, len(srt)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 1:
            ranks[order[a:b]] = 0.5 * (a + 1 + b)
    return float((ranks[:len(sp)].sum() - len(sp) * (len(sp) + 1) / 2) / (len(sp) * len(sn)))


def two_way_pauc(y_true, y_score, min_tpr: float = 0.7, max_fpr: float = 0.3) -> float:
    """Two-way pAUC (TPR ≥ min_tpr, FPR ≤ max_fpr) as LibAUC's ``pauc_roc_score``: the plain AUC between the
    ``round((1 − min_tpr)·n+)`` lowest-scored positives and the ``round(max_fpr·n−)`` highest-scored negatives
    (at least one of each), i.e. the fraction of correctly ordered hard pairs (ties count ½)."""
    if not 0 <= min_tpr < 1 or not 0 < max_fpr <= 1:
        raise ValueError(f"need 0 <= min_tpr < 1 and 0 < max_fpr <= 1, got {min_tpr}, {max_fpr}")
    pos, s = _as_numpy(y_true, y_score)
    sp, sn = np.sort(s[pos]), np.sort(s[~pos])[::-1]
    k_pos = max(1, int(round(len(sp) * (1 - min_tpr))))
    k_neg = max(1, int(round(len(sn) * max_fpr)))
    return _mann_whitney(sp[:k_pos], sn[:k_neg])
