"""The thin Lightning adapter: mixin, settings and strategies."""

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
    "DSGDSettings",
    "DSGDSingleDeviceStrategy",
    "verify_ranks_agree",
    "with_dsgd",
]
