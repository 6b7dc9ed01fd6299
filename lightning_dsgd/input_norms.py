"""Recording the norms of the layers' inputs, behind the ``data`` constants."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_dsgd.geometry import reduction_dtype
from lightning_dsgd.layers import Layer
from lightning_dsgd.precision import reduced_precision_reason


class InputNormRecorder:
    """Forward pre-hooks that keep, per layer, the running maximum over samples of a bound on the
    norm of the layer's augmented input ``[x; 1]`` (ℓ2 or ℓ∞), as a device tensor (no host sync).

    * linear, attention: the input rows themselves (q, k, v read the query, key, value argument);
    * conv: ``√(k·c·max x² + 1)`` in ℓ2 (``k·c`` inputs per patch, each at most ``max |x|``),
      ``max(max |x|, 1)`` in ℓ∞ — an upper bound on every patch, cheap to take;
    * other kinds are not watched (their entry stays ``None``).

    Only forwards with gradients enabled are recorded (evaluation passes do not count). The
    maximum runs over every forward since `reset()`, so accumulated micro-batches are covered.

    ``rows[i]`` counts the input rows a linear or attention block multiplied since the reset (a
    Python int, from shapes alone): its gradient ``Σ_t δ_t [x_t; 1]ᵀ`` has rank at most that.
    ``precision_reason`` says why a recorded forward computed a perturbed gradient (autocast,
    TF32: [`reduced_precision_reason`][lightning_dsgd.precision.reduced_precision_reason]), ``None`` if none did.
    """

    WATCHED = ("linear", "conv", "attention")

    def __init__(self, layers: Sequence[Layer], norm: str) -> None:
        self._ord = 2 if norm == "l2" else float("inf")
        self.layers = list(layers)
        self.maxima: list[Tensor | None] = [None] * len(layers)
        self.rows: list[int | None] = [None] * len(layers)
        self.precision_reason: str | None = None
        self.enabled = True  # off: forwards are not recorded (e.g. between observed steps)
        self._handles = []
        by_module: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            if layer.kind in self.WATCHED:
                by_module.setdefault(id(layer.module), []).append(i)
        for indices in by_module.values():
            module = layers[indices[0]].module
            self._handles.append(module.register_forward_pre_hook(self._hook_for(module, indices), with_kwargs=True))

    def _hook_for(self, owner: nn.Module, indices: list[int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # A deep copy of the model (EMA/SWA copies) carries this hook along: ignore the copy.
            if not self.enabled or module is not owner or not torch.is_grad_enabled():
                return
            for i in indices:
                x = self._input_of(self.layers[i], args, kwargs)
                if x is None:
                    continue
                layer = self.layers[i]
                if x.numel() == 0:
                    raise ValueError(
                        f"Layer {layer.name!r} received an empty input (shape {list(x.shape)}): DSGD cannot take a "
                        "step on an empty batch (its mean loss is 0/0). Drop empty batches before the forward, "
                        "e.g. DataLoader(drop_last=True) or skip them in training_step by returning None."
                    )
                value = self._bound(layer, x.detach())
                current = self.maxima[i]
                self.maxima[i] = value if current is None else torch.maximum(current, value)
                if layer.kind != "conv":
                    self.rows[i] = (self.rows[i] or 0) + x.numel() // max(x.shape[-1], 1)
                if self.precision_reason is None:
                    self.precision_reason = reduced_precision_reason(x.device.type)

        return hook

    @staticmethod
    def _input_of(layer: Layer, args: tuple, kwargs: dict) -> Tensor | None:
        """The tensor the block multiplies: its ``argument`` (the query, key or value of an attention)."""
        position, keyword = layer.argument
        if len(args) > position:
            return args[position]
        return kwargs.get(keyword)

    def _bound(self, layer: Layer, x: Tensor) -> Tensor:
        dtype = reduction_dtype(x.dtype)
        if layer.kind == "conv":
            peak = x.abs().amax().to(dtype)
            if self._ord != 2:
                return peak.clamp(min=1.0)
            return (peak.square() * layer.in_features).add(1.0).sqrt()
        if x.dim() == 1:
            x = x.unsqueeze(0)
        value = torch.linalg.vector_norm(x, self._ord, dim=-1, dtype=dtype).amax()
        return value.square().add(1.0).sqrt() if self._ord == 2 else value.clamp(min=1.0)

    def reset(self) -> None:
        self.maxima = [None] * len(self.maxima)
        self.rows = [None] * len(self.rows)
        self.precision_reason = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
