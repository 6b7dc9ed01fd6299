"""Two gloo processes, FSDP2 in plain PyTorch, a model with an embedding, a LayerNorm, fused
attention (q, k, v blocks of one sharded parameter) and a one-row head (an empty shard on rank 1):
DSGD with the work shared must take the same steps as every rank scoring every layer.

    python tests/lightning/plain_fsdp_run.py PORT  # prints "identical" on success
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_dsgd import DSGD
from lightning_dsgd.distributed import all_gather_rows, all_reduce_max, full


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(self.mid(h))).mean(dim=(1, 2))


def train(share: bool, steps: int = 6) -> tuple[DSGD, list, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in (model.embed, model.norm, model.attn, model.mid, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = DSGD(model, loss="mse", gather=all_gather_rows(), reduce_max=all_reduce_max(), share_work=share)
    rank, world, layers = dist.get_rank(), dist.get_world_size(), []
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randint(0, 11, (4, 6), generator=g), torch.randn(4, generator=g)
        nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        opt.step()
        opt.zero_grad()
        layers.append(opt.last_step.layers)
    return opt, layers, {k: full(v).detach().clone() for k, v in model.state_dict().items()}


def worker(rank: int, port: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shared, shared_layers, shared_weights = train(True)
        assert shared.work_plan.shared and 0 < shared.work_plan.layers_scored < len(shared.layers)
        assert shared.work_plan.gradients_gathered == shared.work_plan.layers_scored
        assert shared.work_plan.most_gradients_alive == 1  # one gathered full gradient at a time
        replicated, layers, weights = train(False)
        assert not replicated.work_plan.shared
        assert shared_layers == layers
        for name, value in weights.items():
            assert torch.equal(shared_weights[name], value), name
        if rank == 0:
            print("identical", flush=True)
    except BaseException:
        # Printed before the process group goes: tearing it down with the other rank still inside a
        # collective can abort the process before spawn reports the exception.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()
    # Every check passed. Leave without the interpreter's C++ teardown: about one exit in five aborted
    # there under pytest ("terminate called without an active exception", faulthandler: no Python
    # frame left) after "identical" was printed — in torch's gloo/FSDP2 statics, not in DSGD's steps.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
