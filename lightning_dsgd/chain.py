"""The rigorous class: is the model a chain (docs/theory.md, "The rigorous class")?

A *chain* is ``nn.Linear`` layers with exactly one ``nn.Tanh`` or ``nn.Sigmoid`` between
consecutive layers and linear logits at the end. It is found in an ``nn.Sequential`` anywhere
inside the model (nested ``nn.Sequential`` bodies are flattened), or declared by the user as the
list of its modules in forward order. [find_chain][lightning_dsgd.chain.find_chain] makes the
whole decision (structure, loss, norm) and returns ``(chain, reason)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_dsgd.layers import Layer
from lightning_dsgd.smoothness import ACTIVATION_BOUNDS, ActivationBounds

#: Modules that may stand anywhere in a chain without changing the maths.
_TRANSPARENT = (nn.Identity, nn.Flatten)

RIGOROUS_CLASS = (
    "nn.Linear layers with one nn.Tanh or nn.Sigmoid between consecutive layers, ending in linear "
    "logits for softmax cross-entropy, inside an nn.Sequential or declared with DSGD(..., chain=[...])"
)


#: The norms whose certified constants are derived (docs/theory.md, "The formula").
RIGOROUS_NORMS = ("spectral", "frobenius", "linf")


@dataclass(frozen=True, eq=False)
class Chain:
    """A rigorous chain: ``layers[0]`` sees the model input; ``activations[j]`` (``j ≥ 1``) is
    applied between ``layers[j-1]`` and ``layers[j]`` (``activations[0]`` is ``None``)."""

    layers: list[Layer]
    activations: list[ActivationBounds | None]


def find_chain(
    model: nn.Module,
    layers: Sequence[Layer],
    chain: Sequence[nn.Module] | None = None,
    *,
    loss_certified: bool = True,
    norm: str = "spectral",
) -> tuple[Chain | None, str | None]:
    """``(chain, None)`` when ``layers`` (reordered into forward order) form a rigorous chain trained
    with a certified loss in a norm the constants hold for; else ``(None, reason)``, the reason
    naming what puts the model outside the rigorous class. A declared ``chain`` that is not a chain
    raises ``ValueError``: the user asserted the class."""
    found = _structure(model, layers, chain)
    if isinstance(found, str):
        return None, found
    if not loss_certified:
        return None, "the loss is not certified"
    if norm not in RIGOROUS_NORMS:
        return None, f"norm={norm!r}"
    return found, None


def _structure(model: nn.Module, layers: Sequence[Layer], chain: Sequence[nn.Module] | None) -> Chain | str:
    """The chain formed by ``layers``, or what keeps them from forming one."""
    names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    for layer in layers:
        if layer.kind != "linear" or layer.rows is not None or layer.name != names[id(layer.module)]:
            return f"{layer.name!r} ({type(layer.module).__name__}) is not a whole nn.Linear block"
    by_module = {id(layer.module): layer for layer in layers}
    if chain is not None:
        found = _parse_chain(list(chain), names, by_module)
        if isinstance(found, str):
            raise ValueError(
                f"The declared chain is not a rigorous chain: {found}. The rigorous class is {RIGOROUS_CLASS}."
            )
    else:
        found = _search_sequentials(model, names, by_module)
        if isinstance(found, str):
            return found
    missing = [layer.name for layer in layers if all(layer is not other for other in found.layers)]
    if missing:
        return f"trainable module {missing[0]!r} is not part of the layer chain {[x.name for x in found.layers]}"
    return found


def _flatten(modules: Sequence[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        out.extend(_flatten(list(m)) if isinstance(m, nn.Sequential) else [m])
    return out


def _parse_chain(modules: list[nn.Module], names: dict[int, str], by_module: dict[int, Layer]) -> Chain | str:
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
            if id(m) not in names:
                return f"{m!r} is not a module of the model: declare the model's own layers (e.g. model.fc1)"
            if id(m) not in by_module:
                return f"{name!r} is a frozen nn.Linear inside the chain"
            if layers and pending is None:
                return f"{name!r} follows {layers[-1].name!r} with no activation between them"
            layers.append(by_module[id(m)])
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


def _search_sequentials(model: nn.Module, names: dict[int, str], by_module: dict[int, Layer]) -> Chain | str:
    """The outermost nn.Sequential whose body is a chain holding every trainable layer; failing
    that, the largest chain found (the caller names the layers it misses), or what went wrong."""
    problems: list[str] = []
    largest: Chain | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        found = _parse_chain(list(module), names, by_module)
        if isinstance(found, str):
            problems.append(f"nn.Sequential {name or type(model).__name__!r}: {found}")
        elif len(found.layers) == len(by_module):
            return found
        elif largest is None or len(found.layers) > len(largest.layers):
            largest = found
    if largest is not None:
        return largest
    detail = "; ".join(problems) if problems else "the model contains no nn.Sequential"
    return f"no layer chain found in {type(model).__name__} ({detail})"
