"""Federations and the two engines that drive a :class:`~methods.prowd.server.ProWDServer`: a plain in-process
loop and a Flower ``Strategy`` in a Ray simulation (deterministic per-client generators: both give the same
numbers)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..data import dirichlet_split, load_image_dataset
from .quantization import FP_BITS
from .client import ClientUpdate, client_generator, local_train, make_client_model
from .server import METHOD_LABELS, ProWDServer, evaluate_groups


@dataclass
class Federation:
    """Client data (flattened inputs), bitwidths, the server buffer and the test set."""

    client_x: list[Tensor]
    client_y: list[Tensor]
    client_bits: list[int]
    buffer_x: Tensor
    test_x: Tensor
    test_y: Tensor
    in_features: int
    hidden: int = 256
    nblocks: int = 4

    def new_model(self) -> nn.Module:
        return make_client_model(self.in_features, 10, self.hidden, self.nblocks)


def make_federation(dataset: str = "digits", n_clients: int = 10, alpha: float = 0.5, low_bits: int = 2,
                    low_fraction: float = 0.5, buffer_size: int = 100, seed: int = 0, hidden: int = 256,
                    nblocks: int = 4) -> Federation:
    """Dirichlet(α) split of the training set over ``n_clients``; the first ``round(low_fraction·K)`` clients
    (by id) are low-bit, the rest FP32. The server buffer is ``buffer_size`` training samples held out from the
    clients (stratified draw from the same split)."""
    data = load_image_dataset(dataset, seed).flat()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.x_train), generator=gen)
    buf, rest = perm[:buffer_size], perm[buffer_size:]
    parts = dirichlet_split(data.y_train[rest], n_clients, alpha, gen)
    n_low = int(round(low_fraction * n_clients))
    bits = [low_bits] * n_low + [FP_BITS] * (n_clients - n_low)
    return Federation([data.x_train[rest[p]] for p in parts], [data.y_train[rest[p]] for p in parts], bits,
                      data.x_train[buf], data.x_test, data.y_test, data.x_train.shape[1], hidden, nblocks)


def _init_state(fed: Federation, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return {n: p.detach().clone() for n, p in fed.new_model().named_parameters()}


def _make_server(method: str, fed: Federation, seed: int, **server_kw) -> ProWDServer:
    return ProWDServer(method, fed.new_model(), _init_state(fed, seed), fed.client_bits, buffer_x=fed.buffer_x,
                       seed=seed, **server_kw)


def _settings(server: ProWDServer, local_epochs: int, lr: float) -> dict:
    """What an engine ran with: client model width, server buffer, dequantiser steps (read from the server) and
    the local training settings it passed to every client."""
    return {"hidden": server.model.net[0].out_features, "buffer": len(server.buffer_x),
            "deq_steps": server.deq_steps, "local_epochs": local_epochs, "lr": lr}


def run_inprocess(method: str, fed: Federation, rounds: int, *, seed: int = 0, local_epochs: int = 2,
                  lr: float = 1e-3, batch_size: int = 32, progress=None, **server_kw) -> dict:
    """The plain FL loop: every round every client trains locally from its payload, the server aggregates.
    Returns ``{"server", "history": [{bits: acc}] per round}``."""
    server = _make_server(method, fed, seed, **server_kw)
    model = fed.new_model()
    history = []
    rng = progress(range(rounds), desc=METHOD_LABELS[method]) if progress else range(rounds)
    for rnd in rng:
        updates = []
        for cid, (x, y, b) in enumerate(zip(fed.client_x, fed.client_y, fed.client_bits)):
            st = local_train(model, server.payload(b), x, y, b, epochs=local_epochs, lr=lr, batch_size=batch_size,
                             generator=client_generator(seed, rnd + 1, cid))
            updates.append(ClientUpdate(st, len(x), b, cid))
        server.aggregate(updates)
        history.append(evaluate_groups(server, fed.test_x, fed.test_y))
    return {"server": server, "history": history, "settings": _settings(server, local_epochs, lr)}


# ---- Flower ------------------------------------------------------------------------------------------------
def _state_to_ndarrays(state: dict[str, Tensor]) -> list[np.ndarray]:
    return [p.detach().cpu().numpy() for p in state.values()]


def _ndarrays_to_state(names: list[str], arrays) -> dict[str, Tensor]:
    return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}


def _flower_client_fn(spec: dict, context):
    """Flower ``ClientApp`` factory: client ``partition-id`` with its data and bitwidth (runs in a Ray actor)."""
    from flwr.client import NumPyClient

    torch.set_num_threads(1)
    cid = int(context.node_config["partition-id"])
    x, y, bits = spec["x"][cid], spec["y"][cid], spec["bits"][cid]
    torch.manual_seed(0)
    model = make_client_model(spec["in_features"], 10, spec["hidden"], spec["nblocks"])
    names = [n for n, _ in model.named_parameters()]

    class _Client(NumPyClient):
        def fit(self, parameters, config):
            st = local_train(model, _ndarrays_to_state(names, parameters), torch.from_numpy(x), torch.from_numpy(y),
                             bits, epochs=int(config["epochs"]), lr=float(config["lr"]),
                             batch_size=int(config["batch_size"]),
                             generator=client_generator(int(config["seed"]), int(config["round"]), cid))
            return _state_to_ndarrays(st), len(x), {"cid": cid, "bits": bits}

    return _Client().to_client()


def _flower_strategy_class():
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class FlowerProWDStrategy(Strategy):
        """A Flower ``Strategy`` around :class:`ProWDServer`: every round samples all clients, sends each the
        payload of its bitwidth group (known from its first upload; round 1 sends the common initial model),
        aggregates with the server's method and evaluates every group centrally on the test set."""

        def __init__(self, server: ProWDServer, fed: Federation, n_clients: int, fit_config: dict):
            self.server, self.fed, self.n_clients, self.fit_config = server, fed, n_clients, fit_config
            self.names = list(server.global_state)
            self.bits_of: dict[str, int] = {}
            self.history: list[dict[int, float]] = []

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(_state_to_ndarrays(self.server.global_state))

        def configure_fit(self, server_round, parameters, client_manager):
            clients = client_manager.sample(num_clients=self.n_clients, min_num_clients=self.n_clients)
            cfg = {**self.fit_config, "round": server_round}
            out = []
            for c in clients:
                st = self.server.payload(self.bits_of.get(c.cid, FP_BITS))
                out.append((c, FitIns(ndarrays_to_parameters(_state_to_ndarrays(st)), cfg)))
            return out

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"ProWD: {len(failures)} clients failed in round {server_round}: {failures[:1]}")
            updates = []
            for proxy, res in results:
                bits = int(res.metrics["bits"])
                self.bits_of[proxy.cid] = bits
                updates.append(ClientUpdate(_ndarrays_to_state(self.names, parameters_to_ndarrays(res.parameters)),
                                            int(res.num_examples), bits, int(res.metrics["cid"])))
            self.server.aggregate(updates)
            return ndarrays_to_parameters(_state_to_ndarrays(self.server.global_state)), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            if server_round == 0:
                return None
            accs = evaluate_groups(self.server, self.fed.test_x, self.fed.test_y)
            self.history.append(accs)
            return 0.0, {f"acc_{b}bit": a for b, a in accs.items()}

    return FlowerProWDStrategy


def run_flower(method: str, fed: Federation, rounds: int, *, seed: int = 0, local_epochs: int = 2, lr: float = 1e-3,
               batch_size: int = 32, **server_kw) -> dict:
    """The same federation on Flower: ``flwr.simulation.run_simulation`` with one Ray actor on one CPU, the
    ProWD server as a Flower ``Strategy`` and every client a ``NumPyClient`` doing :func:`local_train`."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        from flwr.client import ClientApp
        from flwr.server import ServerApp, ServerAppComponents, ServerConfig
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise ImportError("the Flower engine needs flwr with simulation: pip install 'flwr[simulation]'") from exc
    server = _make_server(method, fed, seed, **server_kw)
    n = len(fed.client_x)
    strategy = _flower_strategy_class()(server, fed, n, {"epochs": local_epochs, "lr": lr, "batch_size": batch_size,
                                                         "seed": seed})
    spec = {"x": [x.numpy() for x in fed.client_x], "y": [y.numpy() for y in fed.client_y],
            "bits": list(fed.client_bits), "in_features": fed.in_features, "hidden": fed.hidden,
            "nblocks": fed.nblocks}

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=functools.partial(_flower_client_fn, spec)),
                   num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False,
                                                 "log_to_driver": False}})
    if len(strategy.history) != rounds:
        raise RuntimeError(f"Flower simulation finished {len(strategy.history)} of {rounds} rounds")
    return {"server": server, "history": strategy.history, "settings": _settings(server, local_epochs, lr)}
