"""The thin Lightning adapter: mixin, settings, strategies, and the monitor callback with its metric."""

from lightning_dsgd.lightning.callback import DSGDMonitor
from lightning_dsgd.lightning.metrics import LayerSelectionFrequency
from lightning_dsgd.lightning.mixin import DSGDMixin, with_dsgd
from lightning_dsgd.lightning.settings import DSGDSettings
from lightning_dsgd.lightning.strategy import (
    DSGDDDPStrategy,
    DSGDModelParallelStrategy,
    DSGDSingleDeviceStrategy,
    verify_ranks_agree,
)

__all__ = [
    "DSGDDDPStrategy",
    "DSGDMixin",
    "DSGDModelParallelStrategy",
    "DSGDMonitor",
    "DSGDSettings",
    "DSGDSingleDeviceStrategy",
    "LayerSelectionFrequency",
    "verify_ranks_agree",
    "with_dsgd",
]
