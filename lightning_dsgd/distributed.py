"""What DSGD needs to decide identically on every rank, in plain ``torch.distributed``.

* Sharded parameters (FSDP2 / ``DTensor``): every norm is computed on the full tensor
  ([full][lightning_dsgd.distributed.full]), and the update of the chosen layer is sliced back to each rank's shard
  ([shard_like][lightning_dsgd.distributed.shard_like]), so all ranks score the same numbers.
* Data-parallel ranks see different batches: the input-norm maxima behind the ``data``
  constants are reduced with a MAX all-reduce ([all_reduce_max][lightning_dsgd.distributed.all_reduce_max]), so the
  constants are those
  of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch ≥ 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch without public DTensor
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

Reducer = Callable[[Tensor], Tensor]
#: ``t`` (one rank's tensor) → ``stack([t of rank 0, t of rank 1, …])``.
Gatherer = Callable[[Tensor], Tensor]


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or the all-gathered value of a ``DTensor``."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's storage of ``t``."""
    return t.to_local() if is_sharded(t) else t


def shard_like(param: Tensor, value: Tensor) -> Tensor:
    """``value`` (the same full tensor on every rank) laid out like ``param``: each rank keeps its
    own slice, without communication."""
    if not is_sharded(param):
        return value
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)  # type: ignore[misc]


def all_reduce_max(group: dist.ProcessGroup | None = None) -> Reducer:
    """A reducer taking the element-wise maximum of a tensor over the ranks of ``group``."""

    def reduce(t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out

    return reduce


def default_reducer() -> Reducer | None:
    """A MAX reducer over the default group when more than one process runs, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return all_reduce_max()
    return None


def all_gather_rows(group: dist.ProcessGroup | None = None) -> Gatherer:
    """A gatherer stacking a (small) tensor of every rank of ``group``, in rank order."""

    def gather(t: Tensor) -> Tensor:
        rows = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, t.contiguous(), group=group)
        return torch.stack(rows)

    return gather


def default_gatherer() -> Gatherer | None:
    """An all-gather over the default group when more than one process runs, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return all_gather_rows()
    return None


def version_key(t: Tensor) -> tuple[int, int]:
    """Changes whenever ``t`` is written in place or its storage is replaced."""
    return (t._version, local(t).data_ptr())


__all__ = [
    "Gatherer",
    "Reducer",
    "all_gather_rows",
    "all_reduce_max",
    "default_gatherer",
    "default_reducer",
    "full",
    "is_sharded",
    "local",
    "shard_like",
    "version_key",
]
