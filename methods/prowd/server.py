"""The ProWD server (one class for every method and both engines) and the evaluation of the model each
bitwidth group deploys."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .quantization import FP_BITS, is_quantized_param, quantize_state
from .client import ClientUpdate, forward_with
from .aggregation import masked_average, swa_masks, weighted_average
from .dequantizer import ProgressiveDequantizer, dequantizer_loss


METHODS = ("fedavg", "grouped", "deq", "swa", "prowd")
METHOD_LABELS = {"fedavg": "FedAvg", "grouped": "GroupedAvg", "deq": "DEQ only", "swa": "SWA only",
                 "prowd": "ProWD"}


class ProWDServer:
    """Server state and aggregation of one method in :data:`METHODS`.

    ``payload(bits)``: the model a client of that bitwidth receives (the group model for GroupedAvg, else the FP
    global; low-bit clients quantise it on receipt). ``aggregate(updates)``: one round. ``group_models()``: the
    deployed model of every bitwidth (``Q_b`` of the global for low-bit groups)."""

    def __init__(self, method: str, model: nn.Module, init_state: dict[str, Tensor], bits_present, *,
                 buffer_x: Optional[Tensor] = None, bit_chain=(2, 4, 8, 32), deq_steps: int = 10,
                 deq_lr: float = 1e-3, kd_weight: float = 1.0, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.model = method, model
        self.bits_present = sorted(set(int(b) for b in bits_present))
        self.global_state = {n: p.detach().clone() for n, p in init_state.items()}
        self.group_state = {b: dict(self.global_state) for b in self.bits_present}
        self.buffer_x, self.deq_steps, self.kd_weight = buffer_x, deq_steps, kd_weight
        self.uses_deq = method in ("deq", "prowd")
        self.uses_swa = method in ("swa", "prowd")
        self.deq = None
        if self.uses_deq:
            low = [b for b in self.bits_present if b != FP_BITS]
            chain = tuple(b for b in bit_chain)
            missing = [b for b in low if b not in chain]
            if missing:
                raise ValueError(f"low bitwidths {missing} are not in bit_chain {chain}")
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.deq = ProgressiveDequantizer(chain)
            self.deq_opt = torch.optim.Adam(self.deq.parameters(), lr=deq_lr)
            self._deq_counter = 0
            self.gen = torch.Generator().manual_seed(seed)
        self.stats: dict[str, list] = {"mask_keep": [], "deq_loss": []}

    def payload(self, bits: int) -> dict[str, Tensor]:
        if self.method == "grouped":
            return self.group_state.get(bits, self.global_state)
        return self.global_state

    def group_models(self) -> dict[int, dict[str, Tensor]]:
        if self.method == "grouped":
            return {b: quantize_state(self.group_state[b], b) for b in self.bits_present}
        return {b: quantize_state(self.global_state, b) for b in self.bits_present}

    def _train_dequantizer(self, fp_states, low_bits) -> None:
        # one FP client's weights per step, cycling through the FP clients of the round
        for step in range(self.deq_steps):
            st = fp_states[(self._deq_counter + step) % len(fp_states)]
            loss = sum(dequantizer_loss(self.deq, self.model, st, b, self.buffer_x, self.kd_weight,
                                        generator=self.gen) for b in low_bits)
            self.deq_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.deq_opt.step()
        self._deq_counter += self.deq_steps
        self.stats["deq_loss"].append(loss.item())

    def aggregate(self, updates: list[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            raise ValueError("aggregate needs at least one client update")
        updates = sorted(updates, key=lambda u: u.cid)
        prev = self.global_state
        fp = [u for u in updates if u.bits == FP_BITS]
        low = [u for u in updates if u.bits != FP_BITS]
        if self.method == "grouped":
            for b in self.bits_present:
                grp = [u for u in updates if u.bits == b]
                if grp:
                    self.group_state[b] = weighted_average([u.state for u in grp], [u.n_samples for u in grp])
            self.global_state = self.group_state.get(FP_BITS, self.group_state[self.bits_present[0]])
            return self.global_state
        if self.method == "fedavg" or not fp or not low:  # single-bitwidth rounds reduce to FedAvg
            self.global_state = weighted_average([u.state for u in updates], [u.n_samples for u in updates])
            return self.global_state
        low_bits = sorted(set(u.bits for u in low))
        if self.uses_deq:
            self._train_dequantizer([u.state for u in fp], low_bits)
            low_states = [self.deq.dequantize_state(u.state, u.bits) for u in low]
        else:
            low_states = [u.state for u in low]
        masks_all = [{} for _ in low]
        if self.uses_swa:
            d_fp = weighted_average([u.state for u in fp], [u.n_samples for u in fp])
            kept, total = 0.0, 0
            for n, w in prev.items():
                if not is_quantized_param(n, w):
                    continue
                # a low-bit client starts from an unbiased (stochastic) rounding of the previous global model
                d_low = torch.stack([st[n] - w for st in low_states])
                masks = swa_masks(d_low, d_fp[n] - w)
                for j in range(len(low)):
                    masks_all[j][n] = masks[j]
                kept += float(masks.sum())
                total += masks.numel()
            self.stats["mask_keep"].append(kept / max(total, 1))
        self.global_state = masked_average([(u.state, u.n_samples) for u in fp],
                                           [(st, u.n_samples, mk) for u, st, mk in zip(low, low_states, masks_all)])
        return self.global_state


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((forward_with(model, state, x).argmax(-1) == y).float().mean())


def evaluate_groups(server: ProWDServer, x: Tensor, y: Tensor) -> dict[int, float]:
    """Test accuracy of the model deployed to every bitwidth group."""
    return {b: accuracy(server.model, st, x, y) for b, st in server.group_models().items()}
