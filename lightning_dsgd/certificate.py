"""How DSGD knows the loss it certifies: it reads the autograd graph of the loss it is handed.

The certified constants of a chain (docs/theory.md, "The rigorous class") hold for ``f(w) = mean_t CE(z_t, y_t)``,
the mean softmax cross-entropy of the chain's logits ``z`` and nothing else. A step is certified
only when the loss handed to ``DSGD.step`` (the closure's result, ``loss=``, or
`DSGD.check_loss`) is, in its graph::

    NllLossBackward0(reduction=mean, no class weights)
      ← LogSoftmaxBackward0(over dimension 1, the classes of a (batch, classes) tensor)
      ← [views, reshapes, clones]*
      ← the output of the chain's last layer, recorded by a forward hook

computed in float32 or wider. Anything else — ``F.mse_loss``, a penalty added, label smoothing, a
softmax over another dimension, a transpose or a cast of the logits, a loss of another module's
output — gives the reason why not. What is read is the loss *handed over*: a closure that
backpropagates another loss than the one it returns is outside what this check can see.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: Autograd nodes that only move or cast the logits (no change of the values that matter).
_PASS_THROUGH = frozenset(
    {
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsafeViewBackward0",
        "CloneBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "ContiguousBackward0",
    }
)
_MEAN = 1  # torch's Reduction::Mean
#: The verdict before any loss was checked for the coming step.
NO_LOSS = "no loss reached DSGD"
_KEEP = 8  # output nodes remembered between two steps (accumulated micro-batches)


class ChainOutputs:
    """Forward hook on the chain's last layer remembering the autograd nodes of its outputs
    (forwards with gradients enabled) since the last `reset`, and the verdict on the losses
    checked since (`check`, `take`). Kept in this one object so that wrappers of the
    optimizer (Lightning's, Fabric's) that copy its attributes still share it. A deep copy of the
    model (EMA, SWA) shares this object and its hook ignores the copy; pickling drops the nodes."""

    def __deepcopy__(self, memo: dict) -> ChainOutputs:
        return self

    def __getstate__(self) -> dict:
        return {**self.__dict__, "nodes": []}

    def __init__(self, module: nn.Module) -> None:
        self._owner = module
        self.nodes: list[Any] = []
        self.problem: str | None = NO_LOSS
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module is self._owner and isinstance(output, Tensor) and output.grad_fn is not None:
            self.nodes = [*self.nodes[-(_KEEP - 1) :], output.grad_fn]

    def check(self, loss: Tensor) -> None:
        """Fold the verdict on one more loss of the coming step into `problem`."""
        problem = cross_entropy_problem(loss, self)
        if self.problem is NO_LOSS or problem is not None:
            self.problem = problem

    def take(self) -> str | None:
        """The verdict for the step being taken; the next starts afresh."""
        problem, self.problem = self.problem, NO_LOSS
        self.nodes = []
        return problem

    def reset(self) -> None:
        self.nodes = []

    def remove(self) -> None:
        self._handle.remove()
        self.nodes = []


def cross_entropy_problem(loss: Tensor, outputs: ChainOutputs) -> str | None:
    """``None`` when ``loss`` is the mean softmax cross-entropy of a recorded chain output, else
    why it is not (a sentence naming what was found)."""
    node = loss.grad_fn
    if node is None:
        return "the loss handed to step has no autograd graph (it was detached)"
    if torch.finfo(loss.dtype).bits < 32:
        return f"the loss is computed in {loss.dtype}, below float32"
    while node.name() == "DivBackward0" and _divides_by_one(node):  # Lightning's loss / accumulation (1)
        node = node.next_functions[0][0]
    if node.name() != "NllLossBackward0":
        return f"the loss is computed by {node.name()}, not by F.cross_entropy of the chain's logits alone"
    try:
        weighted = node._saved_weight is not None
    except RuntimeError:  # a saved weight tensor, freed by backward
        weighted = True
    if getattr(node, "_saved_reduction", _MEAN) != _MEAN or weighted:
        return "the cross-entropy is not the unweighted mean over the batch (reduction='mean', weight=None)"
    log_softmax = node.next_functions[0][0]
    if log_softmax is None or log_softmax.name() != "LogSoftmaxBackward0":
        return "the negative log-likelihood is not taken of a log_softmax (use F.cross_entropy on the logits)"
    ndim = len(log_softmax._input_metadata[0].shape)  # shapes outlive backward; saved tensors do not
    if ndim < 2 or log_softmax._saved_dim % ndim != 1:
        return "the softmax is not taken over the classes (dimension 1 of a (batch, classes) tensor)"
    current = log_softmax.next_functions[0][0]
    while current is not None and current not in outputs.nodes and current.name() in _PASS_THROUGH:
        current = current.next_functions[0][0]
    if current is None or current not in outputs.nodes:
        return "the cross-entropy is not of the chain's last layer's output (something transforms the logits)"
    return None


def _divides_by_one(node: Any) -> bool:
    try:
        other = node._saved_other
    except RuntimeError:  # freed by backward
        return False
    return isinstance(other, Tensor) and other.numel() == 1 and bool(other == 1)


__all__ = ["NO_LOSS", "ChainOutputs", "cross_entropy_problem"]
