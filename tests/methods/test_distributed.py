"""methods.distributed: 2-process gloo DDP / FSDP = single process on the same global batch; exact resume."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from methods import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a tiny ViT on the 8x8 digits: the cheapest model the entry point trains (no transformers import per rank)
TINY = ["--task", "vit", "--data", "digits", "--size", "tiny", "--mlp", "monarch", "--steps", "5",
        "--global-batch", "16", "--threads", "1", "--seed", "3"]


DRIVER = """
import json, sys
import torch.distributed as dist
from methods import distributed as D

dist.init_process_group("gloo")  # one launch, two trainings: D.main reuses the group and leaves it alone
for argv in json.loads(sys.argv[1]):
    D.main(argv)
dist.destroy_process_group()
"""


def _torchrun(runs, tmp_path):
    """Run ``D.main(argv)`` for each argv on 2 gloo ranks under torchrun (one launch keeps the test fast)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           json.dumps(runs)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_ddp_and_fsdp_match_single_process_and_resume_across_layouts(tmp_path):
    single = D.main([*TINY, "--out", str(tmp_path / "single")])
    assert single["world_size"] == 1 and single["strategy"] == "none" and len(single["losses"]) == 5
    ckpt3 = str(tmp_path / "ddp" / "ckpt" / "step_3.pt")
    _torchrun([[*TINY, "--strategy", "ddp", "--save-every", "3", "--out", str(tmp_path / "ddp")],
               [*TINY, "--strategy", "fsdp", "--resume", ckpt3, "--out", str(tmp_path / "fsdp")]], tmp_path)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["strategy"] == "ddp" and ddp["backend"] == "gloo"
    # same global batch split over 2 ranks, gradients averaged: the same trajectory up to float summation order
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=2e-6, atol=1e-6)
    assert len(set(np.round(single["losses"], 4))) > 1  # the loss does move (not a constant trajectory)
    # the checkpoint is plain tensors/containers (weights_only) and knows where it came from
    ckpt = torch.load(ckpt3, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and ckpt["format"] == D.CHECKPOINT_FORMAT
    assert any(k.endswith("mlp.fc1.w1") for k in ckpt["model"])  # Monarch factors, unprefixed names
    # FSDP (2 ranks, sharded) resuming from the DDP checkpoint continues the single-process trajectory
    fsdp = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert fsdp["strategy"] == "fsdp" and fsdp["start_step"] == 3 and fsdp["world_size"] == 2
    np.testing.assert_allclose(fsdp["losses"], single["losses"][3:], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(fsdp["final"]["val_loss"], single["final"]["val_loss"], rtol=1e-5)


def test_resume_continues_the_same_trajectory_bitwise(tmp_path):
    full = D.main([*TINY, "--steps", "6", "--save-every", "2", "--out", str(tmp_path / "a")])
    assert sorted(os.listdir(tmp_path / "a" / "ckpt")) == ["step_2.pt", "step_4.pt", "step_6.pt"]
    resumed = D.main([*TINY, "--steps", "6", "--resume", str(tmp_path / "a" / "ckpt" / "step_4.pt"),
                      "--out", str(tmp_path / "b")])
    assert resumed["start_step"] == 4 and resumed["losses"] == full["losses"][4:]
    assert resumed["final"] == full["final"]
    # --resume auto picks the latest checkpoint of the run folder: nothing left to do after step 6
    again = D.main([*TINY, "--steps", "6", "--resume", "auto", "--out", str(tmp_path / "a")])
    assert again["start_step"] == 6 and again["losses"] == []
    # a different seed gives a different trajectory (the comparison above is not vacuous)
    other = D.main([*TINY[:-1], "4", "--steps", "2", "--out", str(tmp_path / "c")])
    assert other["losses"] != full["losses"][:2]


def test_checkpoint_restores_model_optimizer_and_every_rng(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Linear(6, 3)
        return m, torch.optim.Adam(m.parameters(), lr=1e-2)

    m, opt = make()
    for _ in range(3):
        m(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    gen = torch.Generator().manual_seed(11)
    torch.randn(5, generator=gen)
    path = str(tmp_path / "c.pt")
    D.save_checkpoint(path, m, opt, 3, D.DistEnv(), {"data": gen}, extra={"note": "x"})
    expect = (torch.randn(3), random.random(), np.random.rand(), torch.randn(3, generator=gen))
    m2, opt2 = make()
    gen2 = torch.Generator().manual_seed(0)
    torch.randn(7), random.random(), np.random.rand()  # move every stream away
    info = D.load_checkpoint(path, m2, opt2, D.DistEnv(), {"data": gen2})
    assert info["step"] == 3 and info["extra"] == {"note": "x"}
    got = (torch.randn(3), random.random(), np.random.rand(), torch.randn(3, generator=gen2))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and got[2] == expect[2]
    assert torch.equal(got[3], expect[3])
    assert torch.equal(m2.weight, m.weight)
    assert torch.equal(opt2.state[m2.weight]["exp_avg_sq"], opt.state[m.weight]["exp_avg_sq"])
    with pytest.raises(ValueError, match="no checkpoint file"):
        D.load_checkpoint(str(tmp_path / "missing.pt"), m2, opt2, D.DistEnv())
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a"):
        D.load_checkpoint(str(tmp_path / "other.pt"), m2, opt2, D.DistEnv())
    with pytest.raises(ValueError, match="no state for generator 'eval'"):
        D.load_checkpoint(path, m2, opt2, D.DistEnv(), {"eval": torch.Generator()})


def test_shard_batch_partitions_the_global_batch_and_validates():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    parts = [D.shard_batch((x, y), D.DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        D.shard_batch((x, y), D.DistEnv(rank=0, world_size=4))
    with pytest.raises(ValueError, match="same dim 0"):
        D.shard_batch((x, y[:5]), D.DistEnv())
    with pytest.raises(TypeError, match="tuple of tensors"):
        D.shard_batch(x, D.DistEnv())
    with pytest.raises(ValueError, match="strategy must be one of"):
        D.wrap_model(nn.Linear(2, 2), D.DistEnv(), "zero3")
    with pytest.raises(ValueError, match="device must be"):
        D.init_distributed("tpu")


def test_latest_checkpoint_is_the_largest_step_number(tmp_path):
    assert D.latest_checkpoint(str(tmp_path)) is None
    for step in (9, 10, 100, 20):
        (tmp_path / f"step_{step}.pt").write_bytes(b"")
    (tmp_path / "step_999.pt.tmp").write_bytes(b"")  # an unfinished write is not a checkpoint
    assert D.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_100.pt")
