"""Finding the layers of a model, and recording the norms of their inputs.

A *layer* is one module that owns trainable parameters; its weight and bias form one block
(ALGORITHM.md §1). The rigorous class of ALGORITHM.md §3 is a *chain*: ``nn.Linear`` layers with
exactly one ``nn.Tanh`` or ``nn.Sigmoid`` between consecutive layers and linear logits at the end.
A chain is found in an ``nn.Sequential`` anywhere inside the model (nested ``nn.Sequential``
bodies are flattened), or declared by the user as the list of its modules in forward order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dsgd.geometry import reduction_dtype
from lightning_dsgd.smoothness import ACTIVATION_BOUNDS, ActivationBounds

#: Modules that may stand anywhere in a chain without changing the maths.
_TRANSPARENT = (nn.Identity, nn.Flatten)

SUPPORTED_HINT = (
    "DSGD currently supports its rigorous class (docs/theory.md): nn.Linear layers with one "
    "nn.Tanh or nn.Sigmoid between consecutive layers, ending in linear logits for softmax "
    "cross-entropy, inside an nn.Sequential (or declared with DSGD(..., chain=[...]))."
)


@dataclass(frozen=True, eq=False)
class Layer:
    """One block ``[W, b]``: a module's trainable weight and (optional) bias."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True, eq=False)
class Chain:
    """A rigorous chain: ``layers[0]`` sees the model input; ``activations[j]`` (``j ≥ 1``) is
    applied between ``layers[j-1]`` and ``layers[j]`` (``activations[0]`` is ``None``)."""

    layers: list[Layer]
    activations: list[ActivationBounds | None]


def find_chain(model: nn.Module, chain: Sequence[nn.Module] | None = None) -> Chain:
    """The model's rigorous chain of layers in forward order, or a ``ValueError`` naming the
    module that puts the model outside the rigorous class and what is supported."""
    names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    owners = _trainable_owners(model, names)
    if not owners:
        raise ValueError(
            f"{type(model).__name__} has no trainable layer: every parameter is frozen or the "
            "model has none. Give DSGD a model with at least one trainable nn.Linear."
        )
    for module, _ in owners.values():
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"Module {names[id(module)]!r} ({type(module).__name__}) has trainable parameters "
                f"but is not nn.Linear. {SUPPORTED_HINT}"
            )
    if chain is not None:
        found = _parse_chain(list(chain), names, owners)
        if isinstance(found, str):
            raise ValueError(f"The declared chain is not a rigorous chain: {found}. {SUPPORTED_HINT}")
    else:
        found = _search_sequentials(model, names, owners)
    missing = set(owners) - {id(layer.module) for layer in found.layers}
    if missing:
        name = names[min(missing, key=lambda i: list(names).index(i))]
        raise ValueError(
            f"Trainable module {name!r} is not part of the layer chain "
            f"{[layer.name for layer in found.layers]}. Freeze it, or put every trainable layer "
            f"in one chain. {SUPPORTED_HINT}"
        )
    return found


def _trainable_owners(model: nn.Module, names: dict[int, str]) -> dict[int, tuple[nn.Module, list[nn.Parameter]]]:
    owners: dict[int, tuple[nn.Module, list[nn.Parameter]]] = {}
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            owners[id(module)] = (module, params)
    return owners


def _flatten(modules: Sequence[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        out.extend(_flatten(list(m)) if isinstance(m, nn.Sequential) else [m])
    return out


def _make_layer(module: nn.Linear, name: str) -> Layer | str:
    if not module.weight.requires_grad:
        return f"{name!r} has a trainable bias but a frozen weight"
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    return Layer(name=name, module=module, weight=module.weight, bias=bias)


def _parse_chain(modules: list[nn.Module], names: dict[int, str], owners: dict[int, object]) -> Chain | str:
    """Parse ``Linear (act Linear)*`` (transparent modules anywhere, frozen Linears not allowed
    inside); return a Chain or a string saying what is wrong."""
    layers: list[Layer] = []
    activations: list[ActivationBounds | None] = []
    pending: ActivationBounds | None = None
    for m in _flatten(modules):
        name = names.get(id(m), type(m).__name__)
        if isinstance(m, _TRANSPARENT):
            continue
        if isinstance(m, nn.Linear):
            if id(m) not in owners:
                return f"{name!r} is a frozen nn.Linear inside the chain"
            if layers and pending is None:
                return f"{name!r} follows {layers[-1].name!r} with no activation between them"
            layer = _make_layer(m, name)
            if isinstance(layer, str):
                return layer
            layers.append(layer)
            activations.append(pending)
            pending = None
            continue
        bounds = ACTIVATION_BOUNDS.get(type(m))
        if bounds is None:
            return f"{name!r} ({type(m).__name__}) is not a supported activation (nn.Tanh, nn.Sigmoid)"
        if not layers:
            return f"{name!r} ({type(m).__name__}) comes before the first nn.Linear"
        if pending is not None:
            return f"{name!r} is a second activation after {layers[-1].name!r}"
        pending = bounds
    if not layers:
        return "it contains no nn.Linear"
    if pending is not None:
        return f"it ends with an activation after {layers[-1].name!r}; cross-entropy needs linear logits"
    return Chain(layers=layers, activations=activations)


def _search_sequentials(model: nn.Module, names: dict[int, str], owners: dict[int, object]) -> Chain:
    """The outermost nn.Sequential whose body is a chain holding every trainable layer; failing
    that, the largest chain found (the caller names the layers it misses)."""
    problems: list[str] = []
    largest: Chain | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        found = _parse_chain(list(module), names, owners)
        if isinstance(found, str):
            problems.append(f"nn.Sequential {name or type(model).__name__!r}: {found}")
        elif {id(layer.module) for layer in found.layers} >= set(owners):
            return found
        elif largest is None or len(found.layers) > len(largest.layers):
            largest = found
    if largest is not None:
        return largest
    detail = "; ".join(problems) if problems else "the model contains no nn.Sequential"
    raise ValueError(f"Could not find the layer chain of {type(model).__name__} ({detail}). {SUPPORTED_HINT}")


class InputNormRecorder:
    """Forward pre-hooks that keep, per layer, the running maximum over samples of the norm of
    the layer's augmented input ``[x; 1]`` (ℓ2 or ℓ∞), as a device tensor (no host sync).

    Only forwards with gradients enabled are recorded (evaluation passes do not count). The
    maximum runs over every forward since the last :meth:`reset`, so accumulated micro-batches
    are covered.
    """

    def __init__(self, layers: Sequence[Layer], norm: str) -> None:
        self._ord = 2 if norm == "l2" else float("inf")
        self.maxima: list[Tensor | None] = [None] * len(layers)
        self._modules = [layer.module for layer in layers]
        self._handles = [layer.module.register_forward_pre_hook(self._hook_for(i)) for i, layer in enumerate(layers)]

    def _hook_for(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            # A deep copy of the model (EMA/SWA copies) carries this hook along: ignore the copy.
            if module is not self._modules[index] or not torch.is_grad_enabled() or not args:
                return
            x = args[0].detach()
            if x.dim() == 1:
                x = x.unsqueeze(0)
            norms = torch.linalg.vector_norm(x, self._ord, dim=-1, dtype=reduction_dtype(x.dtype))
            value = norms.amax()
            if self._ord == 2:
                value = value.square().add(1.0).sqrt()
            else:
                value = value.clamp(min=1.0)
            current = self.maxima[index]
            self.maxima[index] = value if current is None else torch.maximum(current, value)

        return hook

    def reset(self) -> None:
        self.maxima = [None] * len(self.maxima)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
