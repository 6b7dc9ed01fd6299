"""lightning_dsgd: duality structure gradient descent (Flynn, arXiv 1708.00523) for PyTorch.

The core (optimizer, geometry, layers, constants) never imports Lightning. The adapter
([lightning_dsgd.lightning][]) loads on first use of one of its names, or as soon as
``lightning.pytorch`` is imported, so the strategy names (``Trainer(strategy="dsgd")``) are registered
whenever Lightning is in use, whichever of the two packages is imported first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lightning_dsgd.chain import Chain, find_chain
from lightning_dsgd.geometry import FrobeniusGeometry, Geometry, LinfGeometry, SpectralGeometry, make_geometry
from lightning_dsgd.layers import Layer
from lightning_dsgd.optimizer import DSGD, StepRecord
from lightning_dsgd.smoothness import CROSS_ENTROPY, SIGMOID, TANH, ActivationBounds, LossBounds

if TYPE_CHECKING:
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

__version__ = "0.1.0"

_ADAPTER = "lightning_dsgd.lightning"
_ADAPTER_NAMES = frozenset(
    {
        "DSGDDDPStrategy",
        "DSGDMixin",
        "DSGDModelParallelStrategy",
        "DSGDMonitor",
        "DSGDSettings",
        "DSGDSingleDeviceStrategy",
        "LayerSelectionFrequency",
        "with_dsgd",
    }
)


def __getattr__(name: str) -> Any:
    """The adapter's names, imported (with Lightning) on first use."""
    if name in _ADAPTER_NAMES:
        return getattr(importlib.import_module(_ADAPTER), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AdapterAfterLightning(importlib.abc.MetaPathFinder):
    """Post-import hook: once ``lightning.pytorch`` has executed, import the adapter (registering the strategies).

    It finds the module's spec with the other finders and wraps only that loader's ``exec_module``;
    it removes itself after the first use.
    """

    target = "lightning.pytorch"

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != self.target:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_adapter(module: ModuleType) -> None:
            exec_module(module)
            importlib.import_module(_ADAPTER)

        loader.exec_module = exec_then_adapter  # type: ignore[method-assign]
        return spec


if _AdapterAfterLightning.target in sys.modules:
    importlib.import_module(_ADAPTER)
elif not any(isinstance(finder, _AdapterAfterLightning) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AdapterAfterLightning())

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
