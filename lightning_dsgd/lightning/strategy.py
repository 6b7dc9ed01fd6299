"""DSGD-aware strategies: single device, DDP and FSDP2 (``ModelParallelStrategy``).

They add to their base strategy exactly what DSGD needs:

* ``connect`` turns a module without [DSGDMixin][lightning_dsgd.DSGDMixin] into a DSGD module (so the mixin is
  optional) and applies the strategy's ``dsgd`` settings;
* ``verify_every_n_steps``: every N optimizer steps all ranks compare the chosen layer and a
  checksum of their weights, and fail loudly naming the rank that diverged.

Every rank decides identically without further help: DDP averages the gradients before the step,
the measured input norms are MAX-reduced ([lightning_dsgd.distributed][]), and by default the
layers are split among the ranks, each scoring its own and sharing its scores in one all-gather
([lightning_dsgd.plan][]; ``DSGDSettings(share_work=False)``: every rank scores every layer on
full tensors). Registered names (after ``import lightning_dsgd``):
``dsgd``, ``dsgd_ddp``, ``dsgd_ddp_spawn``, ``dsgd_model_parallel``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_dsgd.distributed import is_sharded, local
from lightning_dsgd.lightning.mixin import with_dsgd
from lightning_dsgd.lightning.settings import DSGDSettings, as_settings
from lightning_dsgd.optimizer import DSGD


class _DSGDStrategy:
    """What the three strategies share; mixed in before the Lightning base class."""

    def __init__(
        self, *args: Any, dsgd: DSGDSettings | dict | None = None, verify_every_n_steps: int = 0, **kwargs: Any
    ):
        if (
            isinstance(verify_every_n_steps, bool)
            or not isinstance(verify_every_n_steps, int)
            or verify_every_n_steps < 0
        ):
            raise ValueError(f"verify_every_n_steps must be ≥ 0 (0 = never), got {verify_every_n_steps}.")
        super().__init__(*args, **kwargs)
        self.dsgd = None if dsgd is None else as_settings(dsgd)
        self.verify_every_n_steps = verify_every_n_steps

    def connect(self, model: LightningModule) -> None:
        with_dsgd(model, self.dsgd)
        super().connect(model)  # type: ignore[misc]

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        step = self.lightning_module.trainer.global_step + 1  # type: ignore[attr-defined]
        if self.verify_every_n_steps and step % self.verify_every_n_steps == 0:
            raw = getattr(optimizer, "optimizer", optimizer)
            verify_ranks_agree(raw, step)
        return output


def verify_ranks_agree(optimizer: DSGD, step: int) -> None:
    """All-gather (chosen layer, per-layer checksums of the replicated weights) and raise on any
    rank that differs from rank 0. Sharded (FSDP2) weights are compared through their full value."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    record = optimizer.last_step
    layer = -2.0 if record is None else (-1.0 if record.layer is None else float(record.layer))
    sums = []
    for p in (p for group in optimizer.param_groups for p in group["params"]):
        value = p.detach().full_tensor() if is_sharded(p) else local(p.detach())
        sums.append(value.to(torch.float64).sum())
        sums.append(value.to(torch.float64).square().sum())
    device = optimizer.layers[0].weight.device
    mine = torch.cat([torch.tensor([layer], dtype=torch.float64, device=device), torch.stack(sums).to(device)])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for rank, other in enumerate(gathered[1:], start=1):
        if other[0] != gathered[0][0]:
            raise RuntimeError(
                f"DSGD ranks diverged at step {step}: rank {rank} chose layer {int(other[0])} but rank 0 chose "
                f"layer {int(gathered[0][0])}. Use a DSGD strategy or DSGDMixin (they reduce gradients and input "
                "norms before scoring) and call self.manual_backward, never loss.backward()."
            )
        if not torch.equal(other[1:], gathered[0][1:]):
            raise RuntimeError(
                f"DSGD ranks diverged at step {step}: the weights on rank {rank} differ from rank 0 although both "
                "chose the same layer. Something outside DSGD changed weights on one rank only (e.g. a callback "
                "or a loss.backward() that skipped gradient synchronisation)."
            )


class DSGDSingleDeviceStrategy(_DSGDStrategy, SingleDeviceStrategy):
    """``SingleDeviceStrategy`` that runs DSGD (the module needs no mixin). Without ``device`` it
    runs on the device the Trainer chose (``Trainer(accelerator="gpu", devices=[k])``: ``cuda:k``;
    ``devices=1``: ``cuda:0``), which the Trainer hands over as ``parallel_devices``."""

    def __init__(self, device: str | int | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(device="cpu" if device is None else device, **kwargs)
        self._follow_accelerator = device is None
        self._parallel_devices: list[torch.device] | None = None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None and len(devices) > 1:
            raise ValueError(
                f"strategy='dsgd' runs on one device, but the Trainer asked for {len(devices)} ({devices}). "
                "Use Trainer(devices=1) or devices=[k] for one device, or strategy='dsgd_ddp' for several."
            )
        self._parallel_devices = devices

    @property
    def root_device(self) -> torch.device:
        if self._follow_accelerator and self._parallel_devices:
            return torch.device(self._parallel_devices[0])
        if self._follow_accelerator and isinstance(self.accelerator, CUDAAccelerator):
            return torch.device("cuda", 0)
        return super().root_device


class DSGDDDPStrategy(_DSGDStrategy, DDPStrategy):
    """``DDPStrategy`` that runs DSGD; ranks choose identically (averaged gradients, MAX-reduced
    input norms)."""


class DSGDModelParallelStrategy(_DSGDStrategy, ModelParallelStrategy):
    """FSDP2 (``ModelParallelStrategy``) that runs DSGD; each rank gathers and scores the full
    gradients of its own layers only, and the chosen layer's update is applied to each rank's shard."""


def _register() -> None:
    entries: list[tuple[str, type, dict[str, Any]]] = [
        ("dsgd", DSGDSingleDeviceStrategy, {}),
        ("dsgd_ddp", DSGDDDPStrategy, {"start_method": "popen"}),
        ("dsgd_ddp_spawn", DSGDDDPStrategy, {"start_method": "spawn"}),
        ("dsgd_model_parallel", DSGDModelParallelStrategy, {}),
    ]
    for name, cls, init_params in entries:
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=f"{cls.__name__} {init_params}".strip(), **init_params)


_register()
