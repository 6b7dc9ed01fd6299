"""Emulating a GPU on the CPU: parameters on the ``meta`` device stand for parameters on a GPU.

A meta tensor has a device and a shape but no data, so any tensor DSGD makes on the CPU and then
mixes with the parameters' tensors fails exactly as a CPU tensor mixed with a CUDA tensor would.
:class:`MetaHost` answers the reads to the host that DSGD's decisions need (with made-up values
of the right shape) and counts them, together with host-to-device copies: on a GPU each blocking
read and each pageable host-to-device copy synchronises the host with the device.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_READS = {
    Tensor.item: "item",
    Tensor.tolist: "tolist",
    Tensor.__bool__: "__bool__",
    Tensor.__float__: "__float__",
    Tensor.__int__: "__int__",
    Tensor.__index__: "__index__",
    Tensor.numpy: "numpy",
    Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    Tensor.cpu: "cpu",
}
_FROM_DATA = (torch.tensor, torch.as_tensor, Tensor.new_tensor)


def _fake(t: Tensor) -> Tensor:
    """Data for a meta tensor: ones (a finite, positive score; index 1 for integer reads)."""
    return torch.ones(t.shape, dtype=t.dtype)


class MetaHost(TorchFunctionMode):
    """Counts (and fakes) host reads of meta tensors and copies of host data to the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()  # blocking device→host reads
        self.async_copies = 0  # non-blocking device→host copies (no synchronisation on CUDA)
        self.uploads: Counter[str] = Counter()  # host→device copies

    @property
    def total(self) -> int:
        return sum(self.syncs.values()) + sum(self.uploads.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, Tensor) and first.is_meta:
            if func in _READS:
                self.syncs[_READS[func]] += 1
                value = _fake(first)
                if func in (Tensor.cpu, Tensor.nonzero, torch.nonzero):
                    return value if func is Tensor.cpu else value.nonzero()
                return getattr(value, _READS[func])()
            if func is Tensor.to and _target(args, kwargs) == "cpu":
                if kwargs.get("non_blocking"):
                    self.async_copies += 1
                else:
                    self.syncs["to(cpu)"] += 1
                return _fake(first)
        if isinstance(first, Tensor) and not first.is_meta and func in (Tensor.to, Tensor.cuda):
            if _target(args, kwargs) == "meta":
                self.uploads["to(device)"] += 1
        if (func in _FROM_DATA and not isinstance(first, Tensor)) or func is Tensor.new_tensor:
            device = kwargs.get("device", first.device if func is Tensor.new_tensor else None)
            if device is not None and torch.device(device).type == "meta":
                self.uploads[getattr(func, "__name__", str(func))] += 1
        return func(*args, **kwargs)


def _target(args: tuple, kwargs: dict) -> str | None:
    """The device type a ``Tensor.to`` call moves to, if it names one."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            try:
                return torch.device(value).type
            except RuntimeError:
                continue
        if isinstance(value, Tensor):
            return value.device.type
    return None


def host_reads_per_step(opt: Any, loss_fn: Any, steps: int) -> tuple[list[int], MetaHost]:
    """Run ``steps`` DSGD steps on a model whose parameters live on the ``meta`` device, the
    backward outside the count; return the reads and uploads counted in each step (and the
    last step's counter, for the failure message)."""
    per_step = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.enable_grad():
            loss_fn().backward()
        with MetaHost() as host:
            opt.step()
        per_step.append(host.total)
        assert opt.last_step.dual_norms.device.type == "meta"
    return per_step, host
