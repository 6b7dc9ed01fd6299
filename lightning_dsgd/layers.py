"""Finding the layers of a model: every module with trainable parameters, as matrix blocks.

A *layer* is one module that owns trainable parameters; its weight and bias form one block
(docs/theory.md, "Layers and blocks"). Whether the layers form the rigorous class is decided in
[lightning_dsgd.chain][]; the norms of their inputs are recorded by [lightning_dsgd.input_norms][].
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

LayerKind = Literal["linear", "conv", "embedding", "norm", "attention", "parameter"]


@dataclass(frozen=True, eq=False)
class Layer:
    """One block: a matrix view ``[W, b]`` of a module's trainable weight and (optional) bias.

    ``weight`` is seen as ``out × in`` (a conv kernel as ``out × (in·k…)``, a 1-D parameter as a
    column); ``rows`` and ``bias_rows`` select slices of the rows of the weight and of the bias
    (the q, k, v parts of an attention in-projection). ``norm`` names the block's geometry.
    ``argument`` is the forward argument the block multiplies, as ``(position, keyword)``: the
    input, or the query, key or value of an attention.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    kind: LayerKind = "linear"
    norm: str = "spectral"
    rows: slice | None = None
    bias_rows: slice | None = None
    argument: tuple[int, str] = (0, "input")

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def in_features(self) -> int:
        shape = self.weight.shape  # the shape alone: no communication for a sharded (DTensor) weight
        return math.prod(shape[1:]) if len(shape) >= 2 else 1

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The 2-D view of a weight-shaped tensor (the parameter, its gradient or an update)."""
        w = weight[self.rows] if self.rows is not None else weight
        return w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(-1, 1)

    def bias_vector(self, bias: Tensor) -> Tensor:
        return bias[self.bias_rows] if self.bias_rows is not None else bias.reshape(-1)

    def split(self, block_step: Tensor) -> tuple[Tensor, Tensor | None]:
        """A step on the ``[W, b]`` matrix as full-size steps for ``weight`` and ``bias``."""
        k = self.in_features
        return self.embed(block_step[:, :k], None if self.bias is None else block_step[:, k])

    def embed(self, weight_part: Tensor, bias_part: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The weight part ``ΔW`` and bias column ``Δb`` of a block step as full-size steps for
        ``weight`` and ``bias``."""
        return _embed(self.weight, self.rows, weight_part), (
            None if self.bias is None or bias_part is None else _embed(self.bias, self.bias_rows, bias_part)
        )


def _embed(param: Tensor, rows: slice | None, part: Tensor) -> Tensor:
    """``part`` placed at ``rows`` of a zero tensor shaped like ``param`` (or reshaped to it)."""
    if rows is None:
        return part.reshape(param.shape)
    out = torch.zeros(param.shape, dtype=part.dtype, device=part.device)
    out[rows] = part.reshape(out[rows].shape)
    return out


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


#: The forward arguments of ``nn.MultiheadAttention`` that q, k and v multiply.
_QKV = ((0, "query"), (1, "key"), (2, "value"))


def _attention_blocks(name: str, module: nn.MultiheadAttention, norm: str, grouping: str) -> list[Layer]:
    """q, k and v blocks (row slices of a fused in-projection), or one fused block; ``out_proj``
    is an ``nn.Linear`` submodule and gets its own block; any other parameter its own block."""
    blocks: list[Layer] = []
    covered: set[int] = set()
    bias = _trainable(module.in_proj_bias)
    fused = _trainable(module.in_proj_weight)
    e = module.embed_dim
    if fused is not None and grouping == "fused":
        blocks.append(Layer(f"{name}.in_proj", module, fused, bias, "attention", norm, argument=_QKV[0]))  # all rows
        covered = {id(fused)}
    elif fused is not None:
        for i, part in enumerate("qkv"):
            rows = slice(i * e, (i + 1) * e)
            blocks.append(Layer(f"{name}.{part}", module, fused, bias, "attention", norm, rows, rows, _QKV[i]))
        covered = {id(fused)}
    else:
        for i, part in enumerate("qkv"):
            w = _trainable(getattr(module, f"{part}_proj_weight"))
            if w is not None:
                rows = slice(i * e, (i + 1) * e)
                blocks.append(Layer(f"{name}.{part}", module, w, bias, "attention", norm, None, rows, _QKV[i]))
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
