"""One replay memory for the recipes that keep one: OCM's reservoir of stream examples (Guo et al., "Online
Continual Learning through Mutual Information Maximization", ICML 2022, §4.3; Vitter's reservoir sampling) and
IREM's ring of optimisation states (Du et al., "Learning Iterative Reasoning through Energy Minimization", ICML
2022, §3.3, "replay buffer")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

POLICIES = ("fifo", "reservoir")


def reservoir_slot(n_seen: int, capacity: int, draw: int) -> int:
    """Slot for the next stream item given ``n_seen`` items before it (``-1``: discard). While the buffer is not
    full the item goes to slot ``n_seen``; afterwards ``draw`` must be uniform in ``[0, n_seen]`` and the item
    replaces slot ``draw`` if ``draw < capacity`` (probability ``capacity/(n_seen+1)``)."""
    if n_seen < capacity:
        return n_seen
    if not 0 <= draw <= n_seen:
        raise ValueError(f"draw must lie in [0, n_seen={n_seen}], got {draw}")
    return draw if draw < capacity else -1


class ReplayBuffer:
    """At most ``capacity`` rows of aligned tensors (row ``i`` of every tensor belongs together).

    ``policy="fifo"``: a ring that overwrites the oldest rows (after ``n`` added rows it holds the last
    ``min(n, capacity)``). ``policy="reservoir"``: reservoir sampling (:func:`reservoir_slot`): after ``n``
    stream items every item is stored with probability ``min(1, capacity/n)``. :meth:`sample` draws uniformly
    from what is stored, with or without replacement, with ``generator`` (also the reservoir's source).
    """

    def __init__(self, capacity: int, generator: Optional[torch.Generator] = None, policy: str = "fifo"):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be a positive int, got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"ReplayBuffer: policy must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.generator = generator or torch.Generator().manual_seed(0)
        self.data: Optional[list[Tensor]] = None  # the storage, ``capacity`` rows per tensor
        self.n_seen = 0  # rows ever added
        self._next = 0  # fifo: the ring position

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def stored(self) -> tuple[Tensor, ...]:
        """Views of the rows stored so far (``len(self)`` rows per tensor)."""
        if self.data is None:
            raise ValueError("ReplayBuffer.stored: the buffer is empty")
        return tuple(d[:len(self)] for d in self.data)

    def add(self, *rows: Tensor) -> None:
        rows = [t.detach() for t in rows]
        n = rows[0].shape[0]
        if any(r.dim() < 1 or r.shape[0] != n for r in rows):
            raise ValueError(f"ReplayBuffer.add: the tensors must share dim 0, got {[tuple(r.shape) for r in rows]}")
        if self.data is None:
            self.data = [torch.zeros(self.capacity, *r.shape[1:], dtype=r.dtype, device=r.device) for r in rows]
        elif len(rows) != len(self.data) or any(r.shape[1:] != d.shape[1:] for r, d in zip(rows, self.data)):
            raise ValueError(f"ReplayBuffer.add: row shapes {[tuple(r.shape[1:]) for r in rows]} differ from the "
                             f"stored {[tuple(d.shape[1:]) for d in self.data]}")
        if self.policy == "reservoir":
            for i in range(n):
                draw = (int(torch.randint(0, self.n_seen + 1, (1,), generator=self.generator))
                        if self.n_seen >= self.capacity else 0)
                slot = reservoir_slot(self.n_seen, self.capacity, draw)
                if slot >= 0:
                    for d, r in zip(self.data, rows):
                        d[slot] = r[i]
                self.n_seen += 1
            return
        if n > self.capacity:  # only the newest rows survive
            rows, self.n_seen, n = [r[-self.capacity:] for r in rows], self.n_seen + n - self.capacity, self.capacity
        idx = (self._next + torch.arange(n)) % self.capacity
        for d, r in zip(self.data, rows):
            d[idx.to(d.device)] = r.to(d.dtype)
        self._next = (self._next + n) % self.capacity
        self.n_seen += n

    def sample(self, n: int, replace: bool) -> tuple[Tensor, ...]:
        """``n`` rows drawn uniformly with replacement, or ``min(n, len(self))`` distinct rows without (copies)."""
        if len(self) == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = (torch.randint(0, len(self), (n,), generator=self.generator) if replace
               else torch.randperm(len(self), generator=self.generator)[:n])
        return tuple(d[idx.to(d.device)].clone() for d in self.data)
