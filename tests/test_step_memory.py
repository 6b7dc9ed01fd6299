"""Memory of one ``DSGD.step``: the tensors it makes stay within a few blocks beyond one direction
per moving layer (the full buffers of a layer are dropped as soon as used, every-layer directions
are scored one block at a time). Counted exactly: every storage an operator returns inside the
step, alive until its Python object dies."""

from __future__ import annotations

import weakref

import torch
from helpers.models import classification_data, mlp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_dsgd import DSGD


class LiveBytes(TorchDispatchMode):
    """The largest sum of the bytes of the storages made inside, alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        given = tree_flatten((args, kwargs))[0]
        inputs = {a.untyped_storage().data_ptr() for a in given if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live or ptr in inputs or storage.nbytes() == 0:
                continue
            self.live[ptr] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)


def test_every_layer_step_holds_one_direction_per_layer_and_a_few_blocks():
    width, depth = 96, 6  # exact SVD directions (below the CPU matmul-path side), no sketch
    model = mlp([width] * depth + [width], seed=0, dtype=torch.float32)
    x, y = classification_data(256, width, width, seed=1, dtype=torch.float32)
    opt = DSGD(model, constants="adaptive")
    block = width * (width + 1) * 4
    peaks = []
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        meter = LiveBytes()
        with meter:
            opt.step()
        assert len(opt.last_step.layers) == depth  # every layer moved
        peaks.append(meter.peak)
    # Kept: the new pending step of every layer (depth blocks); at any time besides them at most
    # the directions of the layers still to move and a few blocks of one layer's work.
    assert max(peaks) <= (2 * depth + 4) * block, [p / block for p in peaks]
