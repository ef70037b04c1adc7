"""Two CPU processes (gloo): every rank holds identical masks and weights after topology updates."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_fixtures import INPUT, TinyNet

from sparsify.nn import sparse_modules
from sparsify.train import TrainConfig, fit
from sparsify.train.distributed import release_process_group
from sparsify.train.data import load_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, schedule: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = load_dataset("synthetic", INPUT, num_classes=10, synthetic_size=(256, 64))
        model = TinyNet(density=0.5)
        before = {n: m.mask.clone() for n, m in sparse_modules(model).items()}
        cfg = TrainConfig(data="synthetic", schedule=schedule, epochs=2, batch_size=16, seed=5,
                          **({"update_every": 3} if schedule in ("rigl", "set") else {}))
        result = fit(model, data, cfg, model_input=INPUT)
        torch.save({"before": before, "masks": {n: m.mask.clone() for n, m in sparse_modules(model).items()},
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                    "test_loss": result["test_loss"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        release_process_group()


# sparse momentum in CI (its masks move by gradient statistics that ranks must share); RigL and SET
# (10 s each) are heavy, for CI's 15 minutes
@pytest.mark.parametrize("schedule", [pytest.param("rigl", marks=pytest.mark.heavy), "sparse-momentum",
                                      pytest.param("set", marks=pytest.mark.heavy)])
def test_two_ranks_hold_identical_masks(schedule, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), schedule), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    changed = False
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        changed = changed or not torch.equal(r0["masks"][n], r0["before"][n])
    assert changed, "the schedule changed no mask, so the test proved nothing"
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["test_loss"] == r1["test_loss"]
