"""``DSGD``: duality structure gradient descent as a ``torch.optim.Optimizer`` (docs/theory.md, "The algorithm").

Each ``step``::

    g_i  = ∇_{W_i} f(w)                      # from the closure's backward, for every layer
    s_i  = ‖g_i‖²_(i)* / L_i(w)              # twice the guaranteed decrease of layer i
    i*   = argmax_i s_i                      # ties → lowest index; non-finite never wins
    W_i* ← W_i* − (η / L_i*) · ρ_i*(g_i*)    # the paper's algorithm: only this layer moves

With the certified constants (``constants="data"`` or ``"architecture"``) one layer moves and, full
batch, the loss drops by at least ``η(1 − η/2)·s_i*`` whenever the step is certified. With the
default adaptive constants every layer moves along its own ``ρ_i`` with its own ``η/L_i``
(``layers_per_step``), uncertified.
``η`` is the param groups' ``lr`` (one group per layer), so LR schedulers schedule ``η``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_dsgd.adaptive import check_adaptive_options
from lightning_dsgd.certificate import NO_LOSS, ChainOutputs
from lightning_dsgd.chain import RIGOROUS_CLASS, Chain, find_chain
from lightning_dsgd.constants import make_constant_model
from lightning_dsgd.distributed import Gatherer, Reducer, all_gather_rows, full, is_sharded, shard_like
from lightning_dsgd.geometry import (
    Basis,
    BlockGrad,
    BlockStep,
    Direction,
    Geometry,
    augment,
    make_geometry,
    reduction_dtype,
    rounding_margin,
)
from lightning_dsgd.layers import Layer, discover_layers
from lightning_dsgd.plan import WorkPlan, process_group_size
from lightning_dsgd.precision import device_constant, full_precision, low_precision_reason
from lightning_dsgd.smoothness import LOSSES, LossBounds

# Every option's values are defined here once; DSGDSettings and the CLI derive from these types.
NormName = Literal["spectral", "frobenius", "linf", "rows"]
ConstantsMode = Literal["data", "architecture", "adaptive"]
Selection = Literal["greedy", "random", "cyclic"]
NonFinitePolicy = Literal["skip", "raise"]
LossName = Literal["cross_entropy", "mse"]

_CONSTANTS: tuple[str, ...] = get_args(ConstantsMode)
_SELECTIONS: tuple[str, ...] = get_args(Selection)
_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
# What DSGD(model) and the Lightning mixin use when the user says nothing (docs/benchmarks.md
# defends the choice); constants="data" is the paper's certified algorithm.
DEFAULT_CONSTANTS: ConstantsMode = "adaptive"


@dataclass(frozen=True)
class StepRecord:
    """What one ``DSGD.step`` decided. Tensors stay on the parameters' device (reading them as
    Python numbers is the caller's choice); per-layer tensors have one entry per layer in
    forward order. ``layers`` lists every layer moved (more than one with ``layers_per_step``);
    ``layer`` is the best of them. ``not_certified_reason`` says why a step that is not skipped
    carries no certificate (``None`` when ``certified``)."""

    step: int
    layer: int | None
    layer_name: str | None
    scores: Tensor
    constants: Tensor
    dual_norms: Tensor
    stationarity: Tensor
    guaranteed_decrease: Tensor
    eta: float
    selection: str
    certified: bool
    skipped: bool
    skip_reason: str | None
    loss: Tensor | None
    layers: tuple[int, ...] = ()
    realized_decrease: Tensor | None = None
    not_certified_reason: str | None = None
    #: Why the arithmetic voids this step's certificate (autocast or TF32 in the forward,
    #: low-precision parameters: see [`lightning_dsgd.precision`][lightning_dsgd.precision]);
    #: ``certified`` is then False (and ``not_certified_reason`` says so too).
    precision_reason: str | None = None


@dataclass(frozen=True)
class _Scored:
    """Everything one evaluation of the layers produced (internal)."""

    etas: list[float]
    grads: list[BlockGrad]
    bases: list[Tensor | None]  # per layer, the basis its duality map must use (sketched spectral)
    dual_norms: Tensor
    constants: Tensor
    scores: Tensor
    masked: Tensor
    best: int
    nonfinite: bool
    skip_reason: str | None
    moving: list[bool] | None = None  # per layer: a nonzero gradient (None: unknown → every layer)
    planned: int | None = None  # random / cyclic choice, agreed over ranks
    precision_reason: str | None = None
    order: list[int] | None = None  # layers by decreasing score (only when several move per step)
    prepared: dict[int, tuple[Direction, bool]] | None = None  # shared work: (ρ_i, has a bias) from scoring


class DSGD(torch.optim.Optimizer):
    """Duality structure gradient descent (Flynn, arXiv 1708.00523).

    Args:
        model: the module to train; DSGD finds its layers itself (every module with trainable
            parameters: Linear, Conv1d/2d/3d, Embedding, normalisation affines, attention
            projections, any other parameter), in registration order.
        norm: per-layer norm of weight matrices: ``"spectral"`` (nuclear dual, ``ρ = ‖G‖_*·UVᵀ``),
            ``"frobenius"`` (``ρ = G``) or ``"linf"`` (ℓ∞→ℓ∞ operator norm). Embeddings use
            ``"rows"`` and normalisation affines ``"linf"`` unless overridden.
        constants: ``"adaptive"`` (default) starts from the certified constants (or an estimate
            outside the rigorous class) and corrects them by the curvature met — not certified;
            with the default ``layers_per_step`` every layer steps. ``"data"`` (the paper's
            certified algorithm) bounds each layer's input by its largest norm in the current
            batch (recorded by forward hooks: run the forward with gradients enabled before
            ``step``); ``"architecture"`` uses worst-case bounds from widths and a data bound;
            both are certified on the rigorous class (tanh/sigmoid MLP chains with softmax
            cross-entropy). Outside the rigorous class, ``"data"`` behaves as ``"adaptive"``.
        eta: step multiplier ``η ∈ (0, 2)``; ``η = 1`` maximises ``η(1 − η/2)``.
        selection: ``"greedy"`` (the best bound), ``"random"`` or ``"cyclic"`` layer choice;
            every choice uses the same step rule and keeps its guaranteed decrease.
        loss: the loss on the model's outputs (mean over the batch): ``"cross_entropy"``
            (rigorous), ``"mse"`` (estimated), or [LossBounds][lightning_dsgd.LossBounds] for your own bounds.
        data_bound: ``B_x ≥ max ‖x‖`` over the data, for ``constants="architecture"`` (a batch
            that exceeds it raises the bound for its own step); ``None`` measures each batch's
            ``max ‖x‖`` (rigorous for each batch's loss; a bad batch affects its own step only).
        chain: the model's layers and activations in forward order, when they are not inside an
            ``nn.Sequential`` (e.g. ``[model.fc1, nn.Tanh(), model.fc2]``): asserts the rigorous class.
        overrides: ``{pattern: {"norm": ..., "grouping": ...}}`` per module name (``fnmatch``),
            see [lightning_dsgd.layers.discover_layers][].
        nonfinite: on an inf/NaN gradient or constant, ``"skip"`` the step (no weight changes,
            recorded as skipped) or ``"raise"`` a ``FloatingPointError``.
        seed: seed of the random layer choice (the same on every rank, so ranks agree).
        momentum: ``μ ∈ [0, 1)``: each layer keeps ``v ← μ v + ρ(g)`` over its own updates and
            steps along ``v`` (restarting ``v`` when ``⟨g, v⟩ ≤ 0``). Not covered by the guarantee.
        layers_per_step: update the best ``k`` layers (or ``"all"``) per step, each with its own
            ``η/L_i``. Each constant assumes the other layers fixed, so ``k > 1`` is a heuristic.
            ``None`` (default): ``"all"`` when the constants are estimated (``"adaptive"``, or any
            mode outside the rigorous class) and the selection is greedy, else 1 — so certified
            constants keep the one-layer step their guarantee is proved for.
        full_batch: every step sees the same data (the loss of step t+1 is the loss after step
            t): the realized decrease is recorded beside the promise, and with ``undo_shortfalls``
            a step that fell short is undone (its layer's constant grows) — so every kept step
            decreased the loss by at least its promise, certified or not.
        adaptive_options: tuning of the adaptive constants
            ([AdaptiveConstants][lightning_dsgd.adaptive.AdaptiveConstants]): ``safety``, ``shrink``,
            ``idle_shrink``, ``idle_reach``, ``floor``, ``max_relative_step``.
        reduce_max: element-wise MAX over data-parallel ranks, applied to the measured input norms
            so that every rank uses the constants of the global batch (the Lightning integration
            sets it; see [lightning_dsgd.distributed][]).
        gather: stacks a small tensor from every data-parallel rank (rows in rank order): each
            step's decision (layer, finiteness, random/cyclic choice) is taken from rank 0's row,
            so ranks agree by construction, and a rank whose own greedy decision differs raises
            (one small collective, folded into the step's single host synchronisation).
        share_work: split the layers among the ranks ([lightning_dsgd.plan][]): each rank scores
            its own layers (under FSDP2 it gathers only their full gradients), the scores travel
            in the step's one all-gather, and the owner of a moving layer computes its direction
            for every rank. ``None`` (default): on when ``gather`` is given (the Lightning
            integration) and ``momentum == 0``; ``False``: every rank scores every layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "spectral",
        constants: ConstantsMode = DEFAULT_CONSTANTS,
        eta: float = 1.0,
        selection: Selection = "greedy",
        loss: str | LossBounds = "cross_entropy",
        data_bound: float | None = None,
        chain: Sequence[nn.Module] | None = None,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        nonfinite: NonFinitePolicy = "skip",
        seed: int = 0,
        momentum: float = 0.0,
        layers_per_step: int | Literal["all"] | None = None,
        full_batch: bool = False,
        undo_shortfalls: bool = False,
        adaptive_options: Mapping[str, float] | None = None,
        reduce_max: Reducer | None = None,
        gather: Gatherer | None = None,
        share_work: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"DSGD needs the model itself (an nn.Module), got {type(model).__name__}: "
                "write DSGD(model) rather than DSGD(model.parameters()); DSGD finds the layers "
                "from the module structure."
            )
        options = check_options(
            norm=norm,
            constants=constants,
            eta=eta,
            selection=selection,
            loss=loss,
            data_bound=data_bound,
            overrides=overrides,
            nonfinite=nonfinite,
            seed=seed,
            momentum=momentum,
            layers_per_step=layers_per_step,
            full_batch=full_batch,
            undo_shortfalls=undo_shortfalls,
            adaptive_options=adaptive_options,
            share_work=share_work,
        )
        eta, seed, momentum, data_bound = options["eta"], options["seed"], options["momentum"], options["data_bound"]
        self.geometry = make_geometry(norm)
        self.loss_bounds = _loss_bounds(loss)

        layers = discover_layers(model, norm, overrides)
        self.chain: Chain | None
        self.not_rigorous_reason: str | None
        self.chain, self.not_rigorous_reason = find_chain(
            model, layers, chain, loss_certified=self.loss_bounds.certified, norm=norm
        )
        rigorous = self.chain is not None
        if not rigorous and constants == "architecture":
            raise ValueError(
                f"constants='architecture' exists only for the rigorous class ({RIGOROUS_CLASS}), and here "
                f"{self.not_rigorous_reason}. Use constants='data' or 'adaptive' (estimated, corrected by the "
                "curvature met)."
            )
        self.layers: list[Layer] = self.chain.layers if self.chain is not None else layers
        self._model = model
        n = len(self.layers)
        if layers_per_step is None:
            estimated = not rigorous or constants == "adaptive"
            layers_per_step = "all" if estimated and selection == "greedy" else 1
        self.layers_per_step = n if layers_per_step == "all" else int(layers_per_step)
        self.constants_mode = constants
        self.selection = selection
        self.nonfinite = nonfinite
        self.momentum = momentum
        self.full_batch = full_batch
        self.undo_shortfalls = undo_shortfalls
        self.geometries: dict[str, Geometry] = {name: make_geometry(name) for name in {x.norm for x in self.layers}}
        groups = [{"params": layer.params, "lr": eta, "name": layer.name} for layer in self.layers]
        super().__init__(_merge_shared(groups), {"lr": eta})
        self._group_of = _group_index(groups, self.param_groups)

        self.constant_model = make_constant_model(
            self.layers,
            self.geometry,
            self.loss_bounds,
            self.chain,
            constants,
            data_bound,
            adaptive_options,
            self.geometry_of,
            full_batch=full_batch,
        )
        self.constant_model.reduce_max = reduce_max
        self.gather = gather
        self.share_work = share_work
        self._work: WorkPlan | None = None
        self._work_key: tuple | None = None
        # Set by a caller that changes the gradients DSGD scores in a way the guarantee does not cover.
        self.external_uncertified_reason: str | None = None
        # The certificate reads the loss's graph back to the chain's logits (lightning_dsgd.certificate).
        # Decided by the constants alone (not the parameters' dtype, which may change after this).
        self._checks_loss = self.constant_model.certified and isinstance(loss, str)
        self._outputs = ChainOutputs(self.layers[-1].module) if self._checks_loss else None
        self._momentum: dict[int, Tensor] = {}
        self._previous: tuple[Tensor, Tensor, list[tuple[Layer, BlockStep]]] | None = None  # (loss, promise, steps)
        self._seed = seed
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._cursor = 0
        self.steps_taken = 0
        self.skipped_steps = 0
        self.selection_counts = [0] * n
        self.last_step: StepRecord | None = None

    # ------------------------------------------------------------------ public properties
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def reduce_max(self) -> Reducer | None:
        return self.constant_model.reduce_max

    @reduce_max.setter
    def reduce_max(self, reducer: Reducer | None) -> None:
        self.constant_model.reduce_max = reducer

    @property
    def work_plan(self) -> WorkPlan:
        """Who scores which layer and computes its direction (made anew when the process group or
        ``gather`` change, e.g. at the first step); ``work_plan.shared`` says whether work is split."""
        key = (self.gather is not None, process_group_size())
        if self._work is None or self._work_key != key:
            share = self.share_work if self.share_work is not None else self.gather is not None and not self.momentum
            self._block_shapes = self._layer_shapes()
            n = len(self.layers)
            self._work = WorkPlan.balanced(self.layers, self._block_shapes) if share else WorkPlan.replicated(n)
            self._work_key = key
        return self._work

    @property
    def uncertified_reason(self) -> str | None:
        """Why this optimizer's steps carry no certificate whatever the loss (``None``: they do
        when the loss is the mean cross-entropy of the chain's logits)."""
        if self.not_rigorous_reason is not None:
            return f"outside the rigorous class: {self.not_rigorous_reason}"
        if self.constants_mode == "adaptive":
            return "constants='adaptive' are estimates corrected by the curvature met"
        if self.layers_per_step != 1:
            return "layers_per_step > 1: each constant assumes the other layers fixed"
        if self.momentum != 0.0:
            return "momentum > 0 steps along the velocity, not the certified direction"
        return (
            low_precision_reason(p.dtype for layer in self.layers for p in layer.params)
            or self.external_uncertified_reason
        )

    @property
    def certified(self) -> bool:
        """True when every step that is not skipped carries the guaranteed decrease: a rigorous
        model, rigorous constants, one layer per step, no momentum, parameters of 32 bits or more
        and nothing else voiding it (``uncertified_reason``); each step's record also checks the
        loss and the forward's precision (``not_certified_reason``)."""
        return self.uncertified_reason is None

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | None = None) -> Tensor | None:  # type: ignore[override]
        """Run the closure (if given), score every layer, update the best one; return the loss.
        ``loss`` (the loss at the current weights) may be passed instead of a closure; it is
        used by ``full_batch``. With every ``lr`` at exactly 0 — how torch's distributed
        checkpointing initialises optimizer state — the call changes nothing and counts nothing."""
        if all(group["lr"] == 0 for group in self.param_groups):
            return None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            loss = result if result is not None else loss  # Lightning's manual-mode closure returns None
        if loss is not None and loss.grad_fn is not None:
            self.check_loss(loss)
        with full_precision(self._device_types()):  # DSGD's own arithmetic: IEEE float32, no autocast
            return self._step(loss)

    def _step(self, loss: Tensor | None) -> Tensor | None:
        """The stages: gradients, scores and agreement (``_score``), direction and update
        (``_update``), record."""
        scored = self._score(plan=True)
        if scored.nonfinite and self.nonfinite == "raise":
            raise FloatingPointError(
                f"DSGD step {self.steps_taken}: {scored.skip_reason}. No weight was changed. Check the "
                "loss for inf/NaN (torch.autograd.detect_anomaly helps); under float16 use a "
                "GradScaler (precision='16-mixed'); or pass nonfinite='skip' to skip such steps."
            )
        realized, undone = self._check_previous(loss)
        if undone is not None:
            scored = replace(scored, nonfinite=False, skip_reason=undone)
        chosen = [] if scored.skip_reason is not None else self._choose(scored)
        steps = [self._update(i, scored) for i in chosen]
        if chosen and self.full_batch and loss is not None:
            promise = self._promise(scored, chosen)
            self._previous = (loss.detach(), promise, [s for s in steps if s is not None])  # type: ignore[assignment]
        record = self._record(scored, chosen, loss, realized, self._take_loss_problem())
        self.skipped_steps += record.skipped
        for i in chosen:
            self.selection_counts[i] += 1
        self.last_step = record
        self.steps_taken += 1
        return loss

    @torch.no_grad()
    def score(self) -> StepRecord:
        """What a greedy ``step()`` would decide on the current gradients, without changing any
        weight, counter or random state (for observing a model trained by another optimizer).
        Consumes what ``step()`` would: the recorded input norms and, with adaptive constants,
        the curvature measurement pending from DSGD's own last step (the multipliers then learn
        from these gradients, and the next ``step()`` does not measure it again)."""
        with full_precision(self._device_types()):
            scored = self._score()
            return self._record(
                scored, [] if scored.skip_reason else [scored.best], None, None, self._take_loss_problem()
            )

    def _device_types(self) -> set[str]:
        return {layer.weight.device.type for layer in self.layers}

    def check_loss(self, loss: Tensor) -> None:
        """Read the graph of this step's loss (call it before ``backward``; ``step(closure)`` and
        ``step(loss=...)`` call it themselves): a certified chain keeps its certificate only for the
        mean softmax cross-entropy of its logits
        ([`lightning_dsgd.certificate`][lightning_dsgd.certificate]). Several calls before one step
        (accumulated micro-batches) must all pass."""
        if self._outputs is not None:
            self._outputs.check(loss)

    def _take_loss_problem(self) -> str | None:
        """Why this step's loss voids the certificate (``None``: it does not); the next step starts
        without a verdict."""
        if self._outputs is None:
            return None
        problem = self._outputs.take()
        if problem is NO_LOSS:
            return (
                "no loss with its autograd graph reached DSGD, so it cannot check that the loss is the mean "
                "cross-entropy of the chain's logits: use step(closure), step(loss=loss) or check_loss(loss)"
            )
        return problem

    def _score(self, plan: bool = False) -> _Scored:
        """Gradients, scores and agreement: dual norms, constants and scores of every layer, and the
        greedy choice (with ``plan``, also the random/cyclic choice), identical on every rank. A
        layer with a zero gradient scores 0 whatever its constant (``0/0`` is not a failure); a
        layer is *bad* only for an inf/NaN gradient, or a nonzero gradient with a constant that is
        inf/NaN or not > 0 (an infinite or uphill step)."""
        work = self.work_plan
        etas = [_check_eta(self.param_groups[self._group_of[i]]["lr"]) for i in range(len(self.layers))]
        if any(layer.weight.grad is None for layer in self.layers):
            _check_layers_attached(self._model, self.layers)
        precision_reason = self.constant_model.recorder.precision_reason or low_precision_reason(
            {p.dtype for layer in self.layers for p in layer.params}
        )
        batch = self.constant_model.take_batch()
        # The weight norms and base constants read only weights and inputs: computed before any
        # full gradient is gathered, their workspaces (exact weight norms) never add to the
        # gradients' memory. Shared work: each exact norm due is computed by its layer's owner and
        # sent along with the scores; the base constants follow the collective.
        followed = self.constant_model.followed_norms() if work.shared else []
        due = [(bounds, bounds.due(indices, keys)) for bounds, indices, keys in followed]
        exact = work.exact_norms(due) if work.shared else None
        base = None if work.shared else self.constant_model.base_constants(batch, *self._score_dtype_device())
        prepared = None
        if work.shared:  # gradients and scores of this rank's layers, one full gradient at a time
            grads, curvatures, dual_norms, bases, prepared = self._score_owned(work, batch.rank_bounds, plan)
        else:
            grads = work.gradients(self.layers)  # gradients: full, of every layer
            curvatures = self.constant_model.curvatures(grads)  # first: the last steps are then released
            dual_norms, bases = self._dual_norms(grads, batch.rank_bounds)  # scores
        planned = torch.full((), float(self._plan() if plan else -1), device=dual_norms.device)
        checks = None
        if work.shared:  # agreement: the step's one collective, each layer's values from its owner
            pending = list(self.constant_model.pending)
            gather = self.gather or all_gather_rows()
            dual_norms, curvatures, planned, checks, norms = work.share_scores(
                gather, self.layers, dual_norms, curvatures, pending, planned, exact
            )
            offset = 0
            for bounds, indices in due:
                assert norms is not None or not indices
                bounds.provide({i: norms[offset + k] for k, i in enumerate(indices)})  # type: ignore[index]
                offset += len(indices)
        if base is None or (base.dtype, base.device) != (dual_norms.dtype, dual_norms.device):
            base = self.constant_model.base_constants(batch, dual_norms.dtype, dual_norms.device)
        constants = self.constant_model.adjust(base, curvatures, dual_norms, etas)
        scores, masked, summary = _decide(dual_norms, constants, planned, self.layers_per_step > 1)
        values = work.read(summary, checks, self.gather, self.steps_taken)  # the one host synchronisation
        best, all_finite, best_score, agreed = values[:4]
        skip_reason = None
        if not all_finite:
            skip_reason = _nonfinite_reason(self.layers, dual_norms, constants, batch.input_bounds)
        elif best_score <= 0.0:  # whatever the selection: no layer can move
            skip_reason = "every layer's gradient is zero or missing (did the closure call backward()?)"
        return _Scored(
            etas,
            grads,
            bases,
            dual_norms,
            constants,
            scores,
            masked,
            int(best),
            not all_finite,
            skip_reason,
            [m > 0 for m in values[4 : 4 + len(self.layers)]],
            int(agreed) if agreed >= 0 else None,
            precision_reason,
            [int(i) for i in values[4 + len(self.layers) :]] if self.layers_per_step > 1 else None,
            prepared,
        )

    def _score_owned(self, work: WorkPlan, rank_bounds: list[int | None], stepping: bool) -> tuple:
        """Shared work: this rank's layers in turn, each full gradient dropped before the next is
        obtained: its curvature along the pending step (which is then released), its dual norm and,
        when ``stepping`` with several layers per step, its direction ``ρ_i`` (``Geometry.direction``;
        the gradient is not obtained again, ``⟨g_i, ρ_i⟩`` comes from the scores; ``None`` otherwise,
        the same on every rank). Returns what ``_score`` takes from the replicated stages."""
        n = len(self.layers)
        grads: list[BlockGrad] = [None] * n
        curvatures: dict[int, Tensor] = {}
        values: list[Tensor | None] = [None] * n
        bases: list[Tensor | None] = [None] * n
        prepared: dict[int, tuple[Direction, bool]] | None = {} if stepping and self.layers_per_step > 1 else None
        for i, grad in work.each_gradient(self.layers):
            grads[i] = grad
            curvatures.update(self.constant_model.curvatures(grads))
            geometry, every = self.geometry_of(self.layers[i]), self.layers_per_step > 1
            norm, found = geometry.dual_norms_and_bases([grad], [rank_bounds[i]], self._sketch_seed(), every)
            values[i], bases[i] = norm[0], found[0]
            del found
            if prepared is not None:  # ρ formed now (the basis released with the gradient); ⟨g, ρ⟩ from the scores
                prepared[i] = self.geometry_of(self.layers[i]).direction(grad, bases[i]), grad[1] is not None
                bases[i] = None
            grads[i] = None
            del grad
        present = [v.dtype for v in values if v is not None]
        dtype = max(present, key=lambda d: torch.finfo(d).bits, default=torch.float32)
        zero = torch.zeros((), dtype=dtype, device=self.layers[0].weight.device)
        dual_norms = torch.stack([zero if v is None else v.to(dtype) for v in values])
        return grads, curvatures, dual_norms, bases, prepared

    def _score_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of this step's scores, known before any gradient is gathered: the
        widest reduction dtype of the gradients (as ``_dual_norms`` makes them), the first layer's device."""
        dtypes = {p.grad.dtype for layer in self.layers for p in layer.params if p.grad is not None}
        dtype = max(map(reduction_dtype, dtypes), key=lambda d: torch.finfo(d).bits, default=torch.float32)
        return dtype, self.layers[0].weight.device

    def _plan(self) -> int:
        """This step's random or cyclic choice (-1 for greedy); the generator and cursor advance
        only when the step is taken (`_choose`)."""
        if self.selection == "random":
            state = self._generator.get_state()
            index = int(torch.randint(len(self.layers), (1,), generator=self._generator, device="cpu"))
            self._generator.set_state(state)
            return index
        return self._cursor if self.selection == "cyclic" else -1

    def _dual_norms(self, grads: list[BlockGrad], rank_bounds: list[int | None]) -> tuple[Tensor, list[Tensor | None]]:
        """Batched per geometry: layers sharing a norm are reduced together."""
        seed = self._sketch_seed()
        out: list[Tensor | None] = [None] * len(grads)
        bases: list[Tensor | None] = [None] * len(grads)
        for name, geometry in self.geometries.items():
            idx = [i for i, layer in enumerate(self.layers) if layer.norm == name]
            if all(grads[i] is None for i in idx):  # e.g. a frozen embedding, the only "rows" layer
                device = self.layers[idx[0]].weight.device
                values, found = torch.zeros(len(idx), device=device), [None] * len(idx)
            else:
                values, found = geometry.dual_norms_and_bases(
                    [grads[i] for i in idx], [rank_bounds[i] for i in idx], seed, self.layers_per_step > 1
                )
            for k, i in enumerate(idx):
                out[i], bases[i] = values[k], found[k]
        dtype = max((t.dtype for t in out if t is not None), key=lambda d: torch.finfo(d).bits)
        return torch.stack([t.to(dtype) for t in out]), bases  # type: ignore[union-attr]

    def _sketch_seed(self) -> int:
        """The seed of this step's sketches: it depends only on the seed and the step count, so
        every rank and a resumed run draw alike."""
        return (self._seed * 1_000_003 + self.steps_taken) % 2**63

    def geometry_of(self, layer: Layer) -> Geometry:
        return self.geometries[layer.norm]

    def _choose(self, scored: _Scored) -> list[int]:
        if self.selection == "random":
            torch.randint(len(self.layers), (1,), generator=self._generator, device="cpu")  # advance, as _plan drew
            return [scored.planned]  # type: ignore[list-item]
        if self.selection == "cyclic":
            index = scored.planned if scored.planned is not None else self._cursor
            self._cursor = (index + 1) % len(self.layers)
            return [index]
        if self.layers_per_step == 1:
            return [scored.best]
        # The best k layers that can move, by the order read in the step's one host synchronisation.
        assert scored.order is not None and scored.moving is not None
        return sorted({i for i in scored.order[: self.layers_per_step] if scored.moving[i]}) or [scored.best]

    def _update(self, index: int, scored: _Scored) -> tuple[Layer, BlockStep] | None:
        """Direction and update: ``W ← W − (η/L_i) · ρ_i(g_i)`` (or along the momentum) on the
        block, computed by the layer's owner and applied in place on every rank (to its shard);
        returns the step taken as ``(layer, block step)``."""
        layer = self.layers[index]
        if scored.moving is not None and not scored.moving[index]:  # the same on every rank
            return None  # a zero or missing gradient: the step is zero (and η/L may be 0/0)
        work, geometry = self.work_plan, self.geometry_of(layer)
        scale = scored.etas[index] / scored.constants[index]
        step_norm = scale * scored.dual_norms[index]
        step = grad_dot_step = None
        prepared = scored.prepared.pop(index, None) if scored.prepared is not None else None
        if work.shared and scored.prepared is None:  # dropped after scoring: obtained again (FSDP2: a collective)
            scored.grads[index] = work.gradient(layer, index)
        if work.owns(index):
            # Each full buffer is dropped as soon as it is used: only the layers still to move hold theirs.
            # ⟨g, Δ⟩ from the scores (step_along): no second pass over the gradient. Split in contiguous
            # parts where no rank needs the block (faster to add and to measure).
            dual_norm, split = scored.dual_norms[index], not work.shared
            if prepared is not None:  # shared work: ρ formed while scoring, the gradient already dropped
                direction, bias = prepared
                del prepared
                step, grad_dot_step = geometry.step_along(direction, bias, dual_norm, scale, split)
                del direction
            else:
                grad, basis = scored.grads[index], scored.bases[index]
                scored.grads[index] = scored.bases[index] = None
                assert grad is not None
                if self.momentum > 0.0:
                    step, scale, step_norm, grad_dot_step = self._momentum_step(index, grad, basis, scale)
                else:
                    step, grad_dot_step = geometry.scaled_step(grad, basis, dual_norm, scale, split)
                del grad, basis
            if not self.constant_model.measures_curvature:
                grad_dot_step = None
        before = self.constant_model.before_step(index)
        if work.shared:
            shape, dtype = self._block_shapes[index], torch.promote_types(layer.weight.dtype, scored.dual_norms.dtype)
            if is_sharded(layer.weight) and not self.undo_shortfalls:  # each rank receives its shard
                work.scatter_step(index, layer, step, dtype)
                # The owner keeps the step for the adaptive curvature (the others a stand-in).
                kept = torch.empty(0, dtype=dtype, device=work.device) if step is None else step.to(dtype)
                grad_dot_step = kept.new_zeros(()) if grad_dot_step is None else grad_dot_step
                bound = step_norm * rounding_margin(reduction_dtype(dtype), max(shape))
                constant = scored.constants[index]
                self.constant_model.after_step(index, before, bound, kept, grad_dot_step, step_norm, constant, shape)
                return None
            step, grad_dot_step = work.share_step(index, step, grad_dot_step, shape, dtype)
        assert step is not None
        self._apply(layer, step)
        # ‖Δ‖ as computed, inflated by the rounding of the direction (‖U Vᵀ‖₂ = 1 only to rounding).
        shape, dtype = self._block_shapes[index], (step if isinstance(step, Tensor) else step[0]).dtype
        bound = step_norm * rounding_margin(reduction_dtype(dtype), max(shape))
        constant = scored.constants[index]
        self.constant_model.after_step(index, before, bound, step, grad_dot_step, step_norm, constant, shape)
        return layer, step

    def _momentum_step(self, index: int, grad: tuple[Tensor, Tensor | None], basis: Basis, scale: Tensor) -> tuple:
        """The step along the velocity ``v ← μ v + ρ(g)`` (restarted when ``⟨g, v⟩ ≤ 0``, so that it
        stays a descent direction, without a host sync), its size (cut to the trust region), its
        norm and ``⟨g, Δ⟩``."""
        block_grad = augment(*grad)
        direction = self.geometry_of(self.layers[index]).duality_map(block_grad, basis)
        buffer = self._momentum.get(index)
        if buffer is not None:
            downhill = ((block_grad.to(buffer.dtype) * buffer).sum() > 0).to(buffer.dtype)
            direction = buffer.mul_(self.momentum * downhill).add_(direction)
        self._momentum[index] = direction
        velocity_norm = self.geometry_of(self.layers[index]).norm(direction)
        # A regime that bounds its steps (the adaptive trust region) bounds this one too.
        scale = self.constant_model.limit(index, scale, velocity_norm)
        step = direction * (-scale)
        return step, scale, scale * velocity_norm, (block_grad.to(step.dtype) * step).sum()

    @staticmethod
    def _apply(layer: Layer, step: BlockStep, undo: bool = False) -> None:
        """``[W, b] ← [W, b] + Δ`` (``undo``: ``− Δ``), each rank on its own shard."""
        parts = layer.split(step) if isinstance(step, Tensor) else layer.embed(*step)
        for param, part in zip(layer.params, parts, strict=False):
            if part is not None:
                part = shard_like(param, part.to(param.dtype))
                param.sub_(part) if undo else param.add_(part)

    @staticmethod
    def _promise(scored: _Scored, chosen: list[int]) -> Tensor:
        """``Σ_i η_i (1 − η_i/2) s_i`` over the ``chosen`` layers (one vector pass when several move)."""
        etas = {scored.etas[i] for i in chosen}
        if len(chosen) == 1 or len(etas) > 1:
            return sum(scored.etas[i] * (1.0 - scored.etas[i] / 2.0) * scored.scores[i] for i in chosen)  # type: ignore[return-value]
        eta = etas.pop()
        scores = scored.scores
        if len(chosen) < len(scores):
            scores = scores[device_constant(tuple(chosen), torch.int64, scores.device)]
        return eta * (1.0 - eta / 2.0) * scores.sum()

    def _check_previous(self, loss: Tensor | None) -> tuple[Tensor | None, str | None]:
        """Full batch: the realized decrease of the previous step, and whether it was undone."""
        previous, self._previous = self._previous, None
        if previous is None or loss is None:
            return None, None
        before, promise, steps = previous
        realized = before - loss.detach()
        if not self.undo_shortfalls:
            return realized, None
        shortfall = realized < promise * (1 - 1e-6) - 1e-7 * before.abs()
        # One host read: undo is a branch (and its message quotes the numbers).
        values = torch.stack([shortfall.to(realized.dtype), realized, promise.to(realized.dtype)])
        short, realized_value, promise_value = values.tolist()
        if not short:
            return realized, None
        for layer, step in steps:
            self._apply(layer, step, undo=True)
            index = self.layers.index(layer)
            self.constant_model.grow(index, 2.0)
        names = [layer.name for layer, _ in steps]
        return realized, (
            f"undid the previous step of {names}: it decreased the loss by {realized_value:.3e}, "
            f"less than its promise {promise_value:.3e}; the constant was raised"
        )

    def _record(
        self,
        scored: _Scored,
        chosen: list[int],
        loss: Tensor | None,
        realized: Tensor | None,
        loss_problem: str | None = None,
    ) -> StepRecord:
        skipped = not chosen
        reason = None if skipped else (self.uncertified_reason or loss_problem or scored.precision_reason)
        index = chosen[0] if chosen and len(chosen) == 1 else (scored.best if chosen else None)
        eta = scored.etas[0 if index is None else index]
        decrease = scored.scores.new_zeros(()) if skipped else self._promise(scored, chosen)
        return StepRecord(
            step=self.steps_taken,
            layer=index,
            layer_name=None if index is None else self.layers[index].name,
            scores=scored.scores,
            constants=scored.constants,
            dual_norms=scored.dual_norms,
            stationarity=scored.masked.max().clamp(min=0.0).sqrt(),
            guaranteed_decrease=decrease,  # type: ignore[arg-type]
            eta=eta,
            selection=self.selection,
            certified=reason is None and not skipped,
            skipped=skipped,
            skip_reason=scored.skip_reason if skipped else None,
            loss=None if loss is None else loss.detach(),
            layers=tuple(chosen),
            realized_decrease=realized,
            not_certified_reason=reason,
            precision_reason=scored.precision_reason,
        )

    def record_skip(self, reason: str) -> None:
        """Record a step that was decided outside DSGD not to happen (e.g. a GradScaler that found
        inf/NaN gradients and never called ``step``): no weight changes, ``skipped=True``."""
        self.discard_input_norms()
        self._take_loss_problem()
        nan = torch.full((len(self.layers),), float("nan"), device=self.layers[0].weight.device)
        etas = [group["lr"] for group in self.param_groups]
        scored = _Scored(etas, [], [], nan, nan, nan, nan, 0, False, reason)
        self.last_step = self._record(scored, [], None, None)
        self.skipped_steps += 1
        self.steps_taken += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus DSGD's own under ``"dsgd"``
        ([extra_state_dict][lightning_dsgd.optimizer.DSGD.extra_state_dict])."""
        state = super().state_dict()
        state["dsgd"] = self.extra_state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of [state_dict][lightning_dsgd.optimizer.DSGD.state_dict]. A state without the ``"dsgd"`` entry
        (distributed
        checkpoint utilities keep only ``state`` and ``param_groups``) loads the torch part; the
        Lightning mixin then restores the rest from its own checkpoint entry. Param groups saved
        under the former key ``"layer_name"`` load under ``"name"``."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("dsgd", None)
        state_dict["param_groups"] = [_renamed(group) for group in state_dict.get("param_groups", [])]
        if extra is None and not all("name" in group for group in state_dict["param_groups"]):
            raise ValueError("This state dict was not saved by DSGD (it has no 'dsgd' entry).")
        if extra is not None:
            self._check_compatible(extra)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.load_extra_state_dict(extra)

    def extra_state_dict(self) -> dict[str, Any]:
        """Everything beyond torch's optimizer state needed to continue identically: counters,
        the random and cyclic selection state, the constant model and momentum buffers. The buffers
        are here, not in torch's per-parameter ``state``: each belongs to a block ``[W, b]`` (or a
        slice of a fused projection), and torch would cast it to the parameter's dtype on load.
        With shared work under FSDP2 this is a collective (each pending adaptive step comes from
        its owner)."""
        if self._work is not None and self._work.shared:
            pending = self.constant_model.pending
            sharded = [i for i in pending if is_sharded(self.layers[i].weight)]
            self._work.complete_pending(pending, sharded, self._block_shapes)
        return {
            "norm": self.geometry.name,
            "constants": self.constants_mode,
            "selection": self.selection,
            "layer_names": self.layer_names,
            "layer_shapes": self._layer_shapes(),
            "steps_taken": self.steps_taken,
            "skipped_steps": self.skipped_steps,
            "selection_counts": list(self.selection_counts),
            "cursor": self._cursor,
            "generator": self._generator.get_state(),
            "constant_model": self.constant_model.state_dict(),
            "momentum": {self.layers[i].name: v for i, v in self._momentum.items()},
        }

    def load_extra_state_dict(self, extra: dict[str, Any]) -> None:
        self._check_compatible(extra)
        device = self.layers[0].weight.device
        self.steps_taken = extra["steps_taken"]
        self.skipped_steps = extra["skipped_steps"]
        self.selection_counts = list(extra["selection_counts"])
        self._cursor = extra["cursor"]
        self._generator.set_state(extra["generator"].cpu())  # a checkpoint mapped to a GPU holds it there
        # Checkpoints saved before the constant model held its trust region keep "weight_norms" here.
        self.constant_model.load_state_dict(
            {"weight_norms": extra.get("weight_norms", {}), **extra["constant_model"]}, device
        )
        names = self.layer_names
        self._momentum = {names.index(name): v.to(device, copy=True) for name, v in extra.get("momentum", {}).items()}

    def _layer_shapes(self) -> list[list[int]]:
        """``[out, in]`` of every layer's ``[W, b]`` block (a checkpoint of other widths is refused)."""
        return [
            [layer.weight_matrix(layer.weight).shape[0], layer.in_features + (layer.bias is not None)]
            for layer in self.layers
        ]

    def _check_compatible(self, extra: dict[str, Any]) -> None:
        for key, mine in (
            ("norm", self.geometry.name),
            ("constants", self.constants_mode),
            ("selection", self.selection),
            ("layer_names", self.layer_names),
            ("layer_shapes", self._layer_shapes()),
        ):
            if key == "layer_shapes" and key not in extra:  # saved before shapes were recorded
                continue
            if extra[key] != mine:
                raise ValueError(
                    f"The DSGD state was saved with {key}={extra[key]!r} but this optimizer has "
                    f"{key}={mine!r}: build the optimizer with the same settings and model to resume."
                )

    def discard_input_norms(self) -> None:
        """Forget the input norms, the outputs and the loss verdict recorded since the last step
        (they belong to no scored step)."""
        self.constant_model.recorder.reset()
        if self._outputs is not None:
            self._outputs.take()

    def record_input_norms(self, enabled: bool) -> None:
        """Switch the input-norm forward hooks on or off (off saves their cost on forwards that
        will not be scored, e.g. between observed steps of another optimizer)."""
        self.constant_model.recorder.enabled = enabled

    def remove_hooks(self) -> None:
        """Detach DSGD's forward hooks (input norms, the chain's logits): after training the model
        pickles as without DSGD. A later ``step`` would need a new optimizer."""
        self.constant_model.recorder.remove()
        if self._outputs is not None:
            self._outputs.remove()


def _decide(dual_norms: Tensor, constants: Tensor, planned: Tensor, ordered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The scores ``s_i = ‖g_i‖²_* / L_i``, the scores with bad layers at ``-inf``, and the summary
    read in the step's one host synchronisation: the greedy choice, finiteness, the best score,
    the planned random/cyclic choice, which layers can move and (``ordered``) their order by score."""
    moving = dual_norms > 0
    usable = torch.isfinite(constants) & (constants > 0)
    finite = torch.isfinite(dual_norms) & (usable | ~moving)
    scores = torch.where(moving & usable, dual_norms.square() / torch.where(usable, constants, 1.0), 0.0)
    masked = torch.where(finite, scores, torch.full_like(scores, float("-inf")))
    parts = [
        torch.stack([masked.argmax().to(scores.dtype), finite.all().to(scores.dtype), masked.max()]),
        planned.to(scores.dtype).reshape(1),
        moving.to(scores.dtype),
    ]
    if ordered:
        parts.append(torch.argsort(masked, descending=True, stable=True).to(scores.dtype))
    return scores, masked, torch.cat(parts)


def _check_layers_attached(model: nn.Module, layers: list[Layer]) -> None:
    """A layer without a gradient: raise if its module or parameter was replaced after DSGD
    was built (the replacement would never be trained)."""
    modules = {id(m) for m in model.modules()}
    params = {id(p) for p in model.parameters()}
    stale = [
        layer.name
        for layer in layers
        if id(layer.module) not in modules or any(id(p) not in params for p in layer.params)
    ]
    if stale:
        raise RuntimeError(
            f"DSGD's layer(s) {stale} are no longer part of the model: a module or parameter was replaced "
            "after the optimizer was built, so the new one would never be trained. Build DSGD (or start "
            "the Trainer's fit) after changing the model."
        )


def _nonfinite_reason(
    layers: list[Layer], dual_norms: Tensor, constants: Tensor, inputs: list[Tensor | None] | None
) -> str:
    """Name the layers and the cause of a bad step (a host sync; only on that path)."""
    names = [layer.name for layer in layers]
    bad_grads = [names[i] for i in torch.nonzero(~torch.isfinite(dual_norms)).flatten().tolist()]
    if bad_grads:
        return f"non-finite gradient (inf/NaN) in layer(s) {bad_grads}"
    moving = dual_norms > 0
    bad = [names[i] for i in torch.nonzero(moving & ~torch.isfinite(constants)).flatten().tolist()]
    zero = [names[i] for i in torch.nonzero(moving & (constants <= 0)).flatten().tolist()]
    bad_inputs = [names[i] for i, b in enumerate(inputs or []) if b is not None and not bool(torch.isfinite(b).all())]
    bad_weights = [layer.name for layer in layers if not all(bool(torch.isfinite(full(p)).all()) for p in layer.params)]
    if bad_inputs:
        return f"non-finite input (inf/NaN) to layer(s) {bad_inputs} in this batch: no weight was changed"
    if bad_weights:
        return f"non-finite smoothness constant for layer(s) {bad}: the weights of {bad_weights} hold inf/NaN"
    if bad:
        return f"non-finite smoothness constant for layer(s) {bad} (an input norm or weight too large to represent)"
    return f"smoothness constant ≤ 0 with a nonzero gradient for layer(s) {zero}: the step would be infinite"


def _merge_shared(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One param group per parameter set: blocks that share a parameter (q, k and v of a fused
    attention projection) share its group, since torch allows a parameter in one group only."""
    merged: list[dict[str, Any]] = []
    seen: dict[int, dict[str, Any]] = {}
    for group in groups:
        owner = next((seen[id(p)] for p in group["params"] if id(p) in seen), None)
        if owner is None:
            owner = {"params": [], "lr": group["lr"], "name": group["name"]}
            merged.append(owner)
        else:
            owner["name"] += "," + group["name"]
        for p in group["params"]:
            if id(p) not in seen:
                owner["params"].append(p)
                seen[id(p)] = owner
    return merged


def _renamed(group: dict[str, Any]) -> dict[str, Any]:
    """A param group with the former key ``"layer_name"`` (a checkpoint saved before the rename) under ``"name"``."""
    if "layer_name" not in group:
        return group
    group = dict(group)
    group.setdefault("name", group.pop("layer_name"))
    return group


def _group_index(groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> list[int]:
    where = {id(p): g for g, group in enumerate(param_groups) for p in group["params"]}
    return [where[id(group["params"][0])] for group in groups]


def check_options(**options: Any) -> dict[str, Any]:
    """Validate DSGD's keyword arguments without a model (``DSGDSettings`` calls it at
    construction); return them with numbers normalised (``eta``, ``momentum`` and ``data_bound``
    as floats, ``seed`` as an int). Raises ``ValueError``/``TypeError`` naming the argument and
    the fix."""
    out = dict(options)
    make_geometry(options["norm"])
    _check_choice("constants", options["constants"], _CONSTANTS)
    _check_choice("selection", options["selection"], _SELECTIONS)
    _check_choice("nonfinite", options["nonfinite"], _POLICIES)
    out["eta"] = _check_eta(options["eta"])
    _loss_bounds(options["loss"])
    out["data_bound"] = _check_data_bound(options["data_bound"], options["constants"])
    _check_overrides(options["overrides"])
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int (the random selection's seed), got {seed!r}.")
    out["seed"] = int(seed)
    momentum = _real("momentum", options["momentum"])
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    out["momentum"] = momentum
    k = options["layers_per_step"]
    if k is not None and k != "all" and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ValueError(
            f"layers_per_step must be an int ≥ 1, 'all', or None (every layer with adaptive constants, "
            f"else one), got {k!r}."
        )
    if k is not None and k != 1 and options["selection"] != "greedy":
        raise ValueError("layers_per_step > 1 takes the best layers: it needs selection='greedy'.")
    for flag in ("full_batch", "undo_shortfalls"):
        if not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {options[flag]!r}.")
    if options["undo_shortfalls"] and not options["full_batch"]:
        raise ValueError("undo_shortfalls needs full_batch=True: only then is the next loss comparable.")
    check_adaptive_options(options["adaptive_options"])
    share = options.get("share_work")
    if share is not None and not isinstance(share, bool):
        raise TypeError(f"share_work must be True, False or None (on under DDP/FSDP2 without momentum), got {share!r}.")
    if share and momentum:
        raise ValueError(
            "share_work=True splits the layers among the ranks, and momentum > 0 keeps a velocity per layer that "
            "only its owner would hold: pass share_work=False (or None) with momentum, or momentum=0."
        )
    return out


def _real(name: str, value: Any) -> float:
    """A real number given as a Python/NumPy number or a one-element tensor (not a bool)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    return float(value)


def _check_eta(eta: Any) -> float:
    value = _real("eta", eta)
    if not 0.0 < value < 2.0:
        raise ValueError(
            f"eta must be a number in (0, 2), got {eta!r}: the guaranteed decrease η(1 − η/2)·s "
            "vanishes at 0 and 2; eta=1 maximises it."
        )
    return value


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name}={value!r}; use one of {list(allowed)}.")


def _check_data_bound(data_bound: Any, constants: str) -> float | None:
    if data_bound is None:
        return None
    if constants != "architecture":
        raise ValueError(
            "data_bound is used only with constants='architecture' (data mode measures "
            "every layer's input itself): drop data_bound or set constants='architecture'."
        )
    value = _real("data_bound", data_bound)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"data_bound must be a finite number > 0 bounding ‖x‖, got {data_bound}.")
    return value


def _check_overrides(overrides: Any) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in overrides.items()
    ):
        raise TypeError(
            f"overrides must map module-name patterns to settings, e.g. {{'head*': {{'norm': 'frobenius'}}}}; "
            f"got {overrides!r}."
        )
    for rule in overrides.values():
        if "norm" in rule:
            make_geometry(rule["norm"])


def _loss_bounds(loss: str | LossBounds) -> LossBounds:
    if isinstance(loss, LossBounds):
        return loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(
            f"Unsupported loss {loss!r}. Known: {sorted(LOSSES)}; for another loss pass "
            "loss=LossBounds(name, g_l2, h_l2, g_linf, h_linf, certified=...) with bounds on its "
            "gradient and curvature in the model's outputs (certified=False for estimates)."
        )
    return LOSSES[loss]
