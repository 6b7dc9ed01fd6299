"""The arithmetic DSGD's own computation runs in, and the settings that void its certificate.

DSGD's margins (``geometry.rounding_margin``, the float32 loss tolerances) assume IEEE float32
(or wider) arithmetic: a matmul in bfloat16 or TF32 errs by ~1e-2 or ~1e-3 relatively, far above
``16·(size + 1)·eps``. [`full_precision`][lightning_dsgd.precision.full_precision] therefore runs
the step outside autocast and with IEEE float32 matmuls on CUDA (cuBLAS) and on the CPU (oneDNN),
whatever the user set, and puts every flag back afterwards. It changes nothing, and costs
nothing, when the flags are already so.

What DSGD cannot undo is the user's own forward and backward: under autocast or reduced float32
matmul precision the gradient (and the loss compared in full batch) is that of a perturbed
function, with errors of the same ~1e-3..1e-2 size, so no decrease of the exact loss is proved.
[`reduced_precision_reason`][lightning_dsgd.precision.reduced_precision_reason] and
[`low_precision_reason`][lightning_dsgd.precision.low_precision_reason] say so, in words a record
can carry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import lru_cache

import torch

#: Per device type, the ``torch.backends`` namespace of its float32 matmul precision knob.
_MATMUL_BACKENDS = {"cuda": "cuda", "cpu": "mkldnn"}
_FULL = ("ieee", "none")  # "none": inherit, and every level defaults to IEEE


def _matmul_precision(device_type: str) -> str:
    """The effective float32 matmul precision on a device type (``"ieee"``, ``"tf32"``, ``"bf16"``)."""
    backend = _MATMUL_BACKENDS.get(device_type)
    if backend is None:
        return "ieee"
    value = getattr(torch.backends, backend).matmul.fp32_precision
    return "ieee" if value in _FULL else value


def reduced_precision_reason(device_type: str) -> str | None:
    """Why a forward/backward run now on ``device_type`` computes a perturbed gradient, or ``None``:
    autocast is on, or float32 matmuls use TF32/bfloat16 internally."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return (
            f"the forward ran under {device_type} autocast ({dtype}), so the gradient is that of a "
            "low-precision function and carries ~1e-2 relative error"
        )
    precision = _matmul_precision(device_type)
    if precision != "ieee":
        return (
            f"the forward ran with reduced float32 matmul precision on {device_type} ({precision}, e.g. "
            "torch.set_float32_matmul_precision('high'|'medium')), so the gradient and the loss carry "
            "~1e-3 relative error"
        )
    return None


def low_precision_reason(dtypes: Iterable[torch.dtype]) -> str | None:
    """Why storing the step in these parameter dtypes voids the certificate, or ``None``: rounding
    a weight to a 16-bit float moves it by up to ``2⁻⁸`` (bfloat16) or ``2⁻¹¹`` (float16) of its
    size, usually more than the whole certified step (and float16 flushes tiny entries to zero)."""
    low = sorted({str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point and torch.finfo(d).bits < 32})
    if not low:
        return None
    return (
        f"parameters are stored in {', '.join(low)}: rounding the update to that dtype changes the applied "
        "step by more than the certified bound allows"
    )


@lru_cache(maxsize=1024)
def device_constant(values: tuple[float, ...] | float, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, dtype, device): a copy of host
    data to a GPU synchronises, so per-step constants are cached. Never write into the result."""
    return torch.tensor(values, dtype=dtype, device=device)


@contextlib.contextmanager
def full_precision(device_types: Iterable[str]) -> Iterator[None]:
    """Run the body outside autocast and with IEEE float32 matmuls on every device type in
    ``device_types`` (and the CPU), restoring the user's settings afterwards."""
    types = set(device_types) | {"cpu"}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(types):
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        if any(_matmul_precision(t) != "ieee" for t in _MATMUL_BACKENDS):
            stack.enter_context(_ieee_matmuls())
        yield


@contextlib.contextmanager
def _ieee_matmuls() -> Iterator[None]:
    """IEEE float32 matmuls inside; the flags restored through the API the user set them with
    (torch ≥ 2.9 refuses to read legacy flags once the new ``fp32_precision`` API wrote them)."""
    backends = [getattr(torch.backends, name).matmul for name in _MATMUL_BACKENDS.values()]
    saved = [b.fp32_precision for b in backends]
    try:
        legacy = torch.get_float32_matmul_precision()
        cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the user is on the new API: stay on it
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        for backend in backends:
            backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
            if torch.backends.cuda.matmul.allow_tf32 != cuda_tf32:
                torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        for backend, value in zip(backends, saved, strict=True):
            if backend.fp32_precision != value:
                backend.fp32_precision = value
