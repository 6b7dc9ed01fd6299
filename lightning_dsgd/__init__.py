"""lightning_dsgd: duality structure gradient descent (Flynn, arXiv 1708.00523) for PyTorch."""

from lightning_dsgd.geometry import FrobeniusGeometry, Geometry, LinfGeometry, SpectralGeometry, make_geometry
from lightning_dsgd.layers import Chain, Layer, find_chain
from lightning_dsgd.lightning import (
    DSGDDDPStrategy,
    DSGDMixin,
    DSGDModelParallelStrategy,
    DSGDMonitor,
    DSGDSettings,
    DSGDSingleDeviceStrategy,
    LayerSelectionFrequency,
    with_dsgd,
)
from lightning_dsgd.optimizer import DSGD, StepRecord
from lightning_dsgd.smoothness import CROSS_ENTROPY, SIGMOID, TANH, ActivationBounds, LossBounds

__version__ = "0.1.0"

__all__ = [
    "CROSS_ENTROPY",
    "DSGD",
    "SIGMOID",
    "TANH",
    "ActivationBounds",
    "Chain",
    "DSGDDDPStrategy",
    "DSGDMixin",
    "DSGDModelParallelStrategy",
    "DSGDMonitor",
    "DSGDSettings",
    "DSGDSingleDeviceStrategy",
    "FrobeniusGeometry",
    "Geometry",
    "Layer",
    "LayerSelectionFrequency",
    "LinfGeometry",
    "LossBounds",
    "SpectralGeometry",
    "StepRecord",
    "find_chain",
    "make_geometry",
    "with_dsgd",
]
