"""Batches for the pairwise losses: a dataset that returns indices, and LibAUC's DualSampler (a fixed share of
positives in every batch)."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor



class IndexedDataset(torch.utils.data.Dataset):
    """``(x[i], y[i], i)`` for tensors ``x (N, ...)`` and ``y (N,)``; the index keys the losses' per-positive state."""

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class DualSampler(torch.utils.data.Sampler):
    """Index sampler giving every consecutive ``batch_size`` chunk ``num_pos = int(sampling_rate·batch_size)``
    positives followed by ``batch_size − num_pos`` negatives (LibAUC's ``DualSampler``).

    Both pools are walked in shuffled order and reshuffled when exhausted (positives are cycled, i.e.
    oversampled); an epoch has ``max(n_pos // num_pos, n_neg // num_neg)`` batches. Use with
    ``DataLoader(IndexedDataset(x, y), batch_size=batch_size, sampler=DualSampler(y, batch_size))`` or iterate
    :meth:`batches` directly."""

    def __init__(self, labels: Tensor, batch_size: int, sampling_rate: float = 0.5, num_pos: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        labels = torch.as_tensor(labels).reshape(-1)
        self.pos = (labels == 1).nonzero().flatten()
        self.neg = (labels == 0).nonzero().flatten()
        if len(self.pos) + len(self.neg) != len(labels):
            raise ValueError("labels must be binary (0/1)")
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError("labels need at least one positive and one negative")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if num_pos is None:
            if not 0 < sampling_rate < 1:
                raise ValueError(f"sampling_rate must be in (0, 1), got {sampling_rate}")
            num_pos = max(1, int(sampling_rate * batch_size))
        if not 1 <= num_pos < batch_size:
            raise ValueError(f"num_pos must be in [1, batch_size), got {num_pos}")
        self.batch_size, self.num_pos, self.num_neg = batch_size, num_pos, batch_size - num_pos
        self.generator = generator or torch.Generator().manual_seed(0)
        self.num_batches = max(len(self.pos) // self.num_pos, len(self.neg) // self.num_neg, 1)

    def _stream(self, pool: Tensor, count: int) -> Tensor:
        out, have = [], 0
        while have < count:
            perm = pool[torch.randperm(len(pool), generator=self.generator)]
            out.append(perm)
            have += len(perm)
        return torch.cat(out)[:count]

    def batches(self) -> Iterator[Tensor]:
        """One epoch of index tensors of shape ``(batch_size,)``."""
        pos = self._stream(self.pos, self.num_batches * self.num_pos).view(self.num_batches, self.num_pos)
        neg = self._stream(self.neg, self.num_batches * self.num_neg).view(self.num_batches, self.num_neg)
        yield from torch.cat([pos, neg], 1)

    def __iter__(self):
        for b in self.batches():
            yield from b.tolist()

    def __len__(self) -> int:
        return self.num_batches * self.batch_size
