"""Finding the layers of a model, and recording the norms of their inputs.

A *layer* is one module that owns trainable parameters; its weight and bias form one block
(docs/theory.md, "Layers and blocks"). The rigorous class (docs/theory.md, "The rigorous class") is
a *chain*: ``nn.Linear`` layers with exactly one ``nn.Tanh`` or ``nn.Sigmoid`` between consecutive
layers and linear logits at the end.
A chain is found in an ``nn.Sequential`` anywhere inside the model (nested ``nn.Sequential``
bodies are flattened), or declared by the user as the list of its modules in forward order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_dsgd.geometry import reduction_dtype
from lightning_dsgd.precision import reduced_precision_reason
from lightning_dsgd.smoothness import ACTIVATION_BOUNDS, ActivationBounds

#: Modules that may stand anywhere in a chain without changing the maths.
_TRANSPARENT = (nn.Identity, nn.Flatten)

RIGOROUS_CLASS = (
    "nn.Linear layers with one nn.Tanh or nn.Sigmoid between consecutive layers, ending in linear "
    "logits for softmax cross-entropy, inside an nn.Sequential or declared with DSGD(..., chain=[...])"
)


LayerKind = Literal["linear", "conv", "embedding", "norm", "attention", "parameter"]


@dataclass(frozen=True, eq=False)
class Layer:
    """One block: a matrix view ``[W, b]`` of a module's trainable weight and (optional) bias.

    ``weight`` is seen as ``out × in`` (a conv kernel as ``out × (in·k…)``, a 1-D parameter as a
    column); ``rows`` and ``bias_rows`` select slices of the rows of the weight and of the bias
    (the q, k, v parts of an attention in-projection). ``norm`` names the block's geometry.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    kind: LayerKind = "linear"
    norm: str = "spectral"
    rows: slice | None = None
    bias_rows: slice | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def in_features(self) -> int:
        return self.weight_matrix(self.weight).shape[1]

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The 2-D view of a weight-shaped tensor (the parameter, its gradient or an update)."""
        w = weight[self.rows] if self.rows is not None else weight
        return w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(-1, 1)

    def bias_vector(self, bias: Tensor) -> Tensor:
        return bias[self.bias_rows] if self.bias_rows is not None else bias.reshape(-1)

    def split(self, block_step: Tensor) -> tuple[Tensor, Tensor | None]:
        """A step on the ``[W, b]`` matrix as full-size steps for ``weight`` and ``bias``."""
        k = self.in_features
        return _embed(self.weight, self.rows, block_step[:, :k]), (
            None if self.bias is None else _embed(self.bias, self.bias_rows, block_step[:, k])
        )


def _embed(param: Tensor, rows: slice | None, part: Tensor) -> Tensor:
    """``part`` placed at ``rows`` of a zero tensor shaped like ``param`` (or reshaped to it)."""
    if rows is None:
        return part.reshape(param.shape)
    out = torch.zeros(param.shape, dtype=part.dtype, device=part.device)
    out[rows] = part.reshape(out[rows].shape)
    return out


@dataclass(frozen=True, eq=False)
class Chain:
    """A rigorous chain: ``layers[0]`` sees the model input; ``activations[j]`` (``j ≥ 1``) is
    applied between ``layers[j-1]`` and ``layers[j]`` (``activations[0]`` is ``None``)."""

    layers: list[Layer]
    activations: list[ActivationBounds | None]


def discover_layers(
    model: nn.Module, norm: str, overrides: Mapping[str, Mapping[str, str]] | None = None
) -> list[Layer]:
    """Every trainable block of ``model`` in module registration order (the forward order of an
    ``nn.Sequential``), frozen parameters ignored.

    ``norm`` is the default geometry; embeddings get ``"rows"`` and normalisation affines
    ``"linf"`` (the operator norm of a diagonal). ``overrides`` maps ``fnmatch`` patterns on
    qualified module names to ``{"norm": ..., "grouping": ...}`` where grouping is ``"module"``
    (weight and bias together, the default), ``"parameter"`` (one block per parameter) or
    ``"fused"`` (an attention in-projection as one block instead of q, k and v).
    """
    rules = dict(overrides or {})
    for pattern, rule in rules.items():
        unknown = set(rule) - {"norm", "grouping"}
        if unknown or rule.get("grouping", "module") not in ("module", "parameter", "fused"):
            raise ValueError(
                f"Override {pattern!r}: {dict(rule)} is not valid; use keys 'norm' (a norm name) and 'grouping' "
                "('module', 'parameter' or 'fused')."
            )
    layers: list[Layer] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule: dict[str, str] = {}
        for pattern, values in rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                rule.update(values)
        layers.extend(_blocks_of(name or type(model).__name__, module, norm, rule))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no trainable layer: every parameter is frozen or the model has none. "
            "Unfreeze at least one parameter (requires_grad=True) before building DSGD."
        )
    return layers


def _blocks_of(name: str, module: nn.Module, norm: str, rule: Mapping[str, str]) -> list[Layer]:
    norm = rule.get("norm", norm)
    grouping = rule.get("grouping", "module")
    weight = _trainable(getattr(module, "weight", None))
    bias = _trainable(getattr(module, "bias", None))
    kind: LayerKind | None = None
    if isinstance(module, nn.Linear):
        kind = "linear"
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kind = "conv"
    elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        kind, norm, bias = "embedding", rule.get("norm", "rows"), None
    elif isinstance(module, _NORM_LAYERS):
        kind, norm = "norm", rule.get("norm", "linf")
    elif isinstance(module, nn.MultiheadAttention):
        return _attention_blocks(name, module, norm, grouping)
    blocks: list[Layer] = []
    covered: set[int] = set()
    if kind is not None and weight is not None:
        if grouping == "parameter" and bias is not None:
            blocks += [
                Layer(f"{name}.weight", module, weight, None, kind, norm),
                Layer(f"{name}.bias", module, bias, None, "parameter", norm),
            ]
        else:
            blocks.append(Layer(name, module, weight, bias, kind, norm))
        covered = {id(weight)} | ({id(bias)} if bias is not None else set())
    for pname, p in module.named_parameters(recurse=False):
        if p.requires_grad and id(p) not in covered:
            blocks.append(Layer(f"{name}.{pname}", module, p, None, "parameter", norm))
    return blocks


def _attention_blocks(name: str, module: nn.MultiheadAttention, norm: str, grouping: str) -> list[Layer]:
    """q, k and v blocks (row slices of a fused in-projection), or one fused block; ``out_proj``
    is an ``nn.Linear`` submodule and gets its own block; any other parameter its own block."""
    blocks: list[Layer] = []
    covered: set[int] = set()
    bias = _trainable(module.in_proj_bias)
    fused = _trainable(module.in_proj_weight)
    e = module.embed_dim
    if fused is not None and grouping == "fused":
        blocks.append(Layer(f"{name}.in_proj", module, fused, bias, "attention", norm))  # all rows
        covered = {id(fused)}
    elif fused is not None:
        for i, part in enumerate("qkv"):
            rows = slice(i * e, (i + 1) * e)
            blocks.append(Layer(f"{name}.{part}", module, fused, bias, "attention", norm, rows, rows))
        covered = {id(fused)}
    else:
        for i, part in enumerate("qkv"):
            w = _trainable(getattr(module, f"{part}_proj_weight"))
            if w is not None:
                rows = slice(i * e, (i + 1) * e)
                blocks.append(Layer(f"{name}.{part}", module, w, bias, "attention", norm, None, rows))
                covered.add(id(w))
    if blocks and bias is not None:
        covered.add(id(bias))
    for pname, p in module.named_parameters(recurse=False):
        if p.requires_grad and id(p) not in covered:
            blocks.append(Layer(f"{name}.{pname}", module, p, None, "parameter", norm))
    return blocks


def _trainable(p: object) -> nn.Parameter | None:
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


_NORM_LAYERS = tuple(
    cls
    for cls in (
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.modules.batchnorm._NormBase,
    )
    if cls is not None
)


def find_chain(model: nn.Module, layers: Sequence[Layer], chain: Sequence[nn.Module] | None = None) -> Chain | str:
    """The rigorous chain formed by ``layers`` (reordered into forward order), or a string saying
    which module puts the model outside the rigorous class. A declared ``chain`` that is not
    rigorous raises ``ValueError``: the user asserted the class."""
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
        self._layers = list(layers)
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
                x = self._input_of(self._layers[i], args, kwargs)
                if x is None:
                    continue
                layer = self._layers[i]
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
        """The tensor the block multiplies: ``query``/``key``/``value`` for q/k/v, else the input."""
        position, keyword = 0, "input"
        if layer.kind == "attention":
            part = layer.name.rsplit(".", 1)[-1]
            position = "qkv".index(part) if part in ("q", "k", "v") else 0
            keyword = ("query", "key", "value")[position]
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
