"""Argument handling shared by the four ops (:mod:`.policy_loss`,
:mod:`.agg_loss`, :mod:`.kl_penalty`, :mod:`.advantage`): type checks that
name the argument, conversions to what the native module takes, the clamp
convention of the installed torch, the normalisers of verl's aggregation, and
what the autograd Functions share in backward.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import _core, _cuda
from ._alloc import empty_host

Number = Union[int, float, torch.Tensor]

# --------------------------------------------------------------------------- torch's clamp convention


def _probe_clamp_closed() -> bool:
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.5, 1.5], requires_grad=True)
        torch.clamp(x, 0.5, 1.5).sum().backward()
    return bool(x.grad.eq(1.0).all())


# Measured once, at import: run lazily inside torch.compile or a torch.func
# transform, the probe's own backward would be traced or refused there.
_CLAMP_CLOSED = _probe_clamp_closed()


def torch_clamp_closed() -> bool:
    """Whether the installed torch's ``clamp`` (with number bounds, as verl
    calls it) passes the gradient to a value lying exactly on a bound.

    torch 2.11 does (the closed interval); torch 2.15 does not. The kernels
    follow whichever torch is installed, measured once at import, so that
    gradients match verl's to the bit even on the bounds.
    """
    return _CLAMP_CLOSED


# --------------------------------------------------------------------------- checks and conversions


def require_tensors(**tensors: Any) -> None:
    """``TypeError`` naming the first argument that is not a ``torch.Tensor``."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def require_strings(**modes: Any) -> None:
    """``TypeError`` naming the first mode argument that is not a string."""
    for name, value in modes.items():
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {type(value).__name__}")


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def check_entry(op: str, name: str, x: Any, **modes: Any) -> None:
    """Argument checks a differentiable entry point makes first: the
    differentiated tensor, no torch.func transform, and string modes."""
    require_tensors(**{name: x})
    if not torch.compiler.is_compiling() and _is_functorch_wrapped(x):
        raise RuntimeError(
            f"{name}: {op} does not support torch.func transforms (grad, vmap, jacrev, ...); "
            "use loss.backward() or torch.autograd.grad"
        )
    require_strings(**modes)


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """A constant input as a detached tensor; DLPack / array-interface
    producers (numpy) are viewed without a copy."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if hasattr(value, "__dlpack__") or hasattr(value, "__array_interface__"):
        strides = getattr(value, "strides", None)
        if strides is not None and any(st < 0 for st in strides):
            raise ValueError(f"{name}: arrays with negative strides are not supported; pass a copy (numpy.ascontiguousarray)")
        return torch.as_tensor(value)
    raise TypeError(f"{name}: expected a torch.Tensor (or an array supporting DLPack), got {type(value).__name__}")


def as_float(name: str, value: Optional[Number]) -> Optional[float]:
    """verl passes normalisers as ints, floats or 0-d tensors."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def to_float(name: str, value: Any) -> float:
    """``float(value)`` for an estimator parameter, naming it when that fails."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from e


def result_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype torch's promotion gives an expression of ``tensors`` (the
    first is the differentiated input, a float tensor; integer and bool
    masks do not change it), i.e. the dtype of verl's loss. A dtype the
    kernels do not read (float8, complex, ...) is a ``TypeError`` naming its
    argument, before torch's promotion fails without naming it."""
    dtype = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"{name}: unsupported dtype {str(t.dtype).removeprefix('torch.')}: expected float32, float64, "
                "bfloat16 or float16 (masks: bool or integers up to 64 bits)"
            )
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


# What the native module reads (src/tensor.rs DType).
_DTYPES = frozenset({
    torch.float64, torch.float32, torch.bfloat16, torch.float16,
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
})  # fmt: skip


# --------------------------------------------------------------------------- normalisers


def normalisers(
    x: torch.Tensor,
    agg_mode: str,
    dp_size: Optional[Number],
    batch_num_tokens: Optional[Number],
    global_batch_size: Optional[Number],
    loss_scale_factor: Optional[Number],
) -> tuple[dict[str, Optional[float]], Optional[torch.Tensor]]:
    """verl's global-batch normalisers of an aggregation ``agg_mode`` over
    ``x``: the native call's keyword options, and the CUDA device factor.

    On the CPU every normaliser becomes a float (0-d tensors are read) and the
    factor is None. For CUDA ``x``, normalisers given as CUDA tensors stay on
    the device (no ``.item()``, see :func:`luspo_rs._cuda.split_normalisers`).
    """
    values = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    if _cuda.on_device(x):
        return _cuda.split_normalisers(agg_mode, values, x.device, as_float)
    return {k: as_float(k, v) for k, v in values.items()}, None


# --------------------------------------------------------------------------- backward


def refuse_double_backward(op: str) -> None:
    """Raises in a backward run with ``create_graph=True``: the fused kernels
    compute the gradient, not a differentiable graph of it, so any second
    derivative taken through it would silently be 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: create_graph=True (double backward, Hessian-vector products) is not supported: "
            "the fused kernel computes the gradient, not a graph of it; use verl's reference "
            "implementation for higher-order derivatives"
        )


def keep_gradient(ctx, grad: torch.Tensor, *inputs: Optional[torch.Tensor]) -> None:
    """Forward's half of the losses' one backward (see :func:`gradient`):
    saves the gradient buffer forward wrote (the only tensor autograd's
    saved-tensor hooks see), and keeps references to the detached inputs,
    with their versions, from which a later backward computes it again."""
    ctx.save_for_backward(grad)
    ctx.handed_over = False
    ctx.inputs = inputs
    ctx.versions = tuple(None if t is None else t._version for t in inputs)


def saved_inputs(ctx) -> tuple[Optional[torch.Tensor], ...]:
    """The inputs :func:`keep_gradient` kept, refused as autograd refuses a
    saved tensor when one was modified in place since forward."""
    for t, v in zip(ctx.inputs, ctx.versions):
        if t is not None and t._version != v:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: an input of shape {tuple(t.shape)} is at version {t._version}; expected version {v}"
            )
    return ctx.inputs


def gradient(ctx, grad_loss: torch.Tensor, rerun) -> torch.Tensor:
    """Backward of both losses, on either device: the gradient times
    ``grad_loss``, with torch's semantics. The first backward scales the
    buffer forward wrote in place (``_core.scale_grad``; ``loss.backward()``'s
    seed of 1 costs no pass over it) and hands it over without a copy; the
    graph never reads it again, so nothing done later changes a gradient
    already returned. A later backward through the same graph
    (``retain_graph=True``) computes the gradient again into a new buffer
    (``rerun()``, one forward pass) and scales that: the same bits as the
    first."""
    if ctx.handed_over:
        grad = rerun()
    else:
        (grad,) = ctx.saved_tensors
        ctx.handed_over = True
    _core.scale_grad(grad, grad_loss, stream=stream_of(grad))
    return grad


def half_gradient(ctx, grad_loss: torch.Tensor, run_again) -> torch.Tensor:
    """Backward of both losses for a float16 differentiated input: forward's
    buffer on the CPU for a first backward with a seed of 1; otherwise the
    gradient computed again (``run_again(factor)``) with ``grad_loss`` in the
    aggregation's scale, so it is rounded to float16 once, after the seed (as
    torch's chain would not overflow where the result fits). On CUDA the seed
    is not read back (no sync), so the gradient is always computed again: one
    more forward pass."""
    if not ctx.handed_over and not _cuda.on_device(grad_loss) and grad_loss.item() == 1.0:
        ctx.handed_over = True
        return ctx.saved_tensors[0]
    factor = ctx.rerun[1]
    seed = grad_loss.detach().reshape(()).to(torch.float64)
    return run_again(ctx, seed if factor is None else factor * seed)


# --------------------------------------------------------------------------- buffers


def stream_of(x: torch.Tensor) -> Optional[int]:
    """The caller's stream for the native call: torch's current stream on
    ``x``'s CUDA device, None on the CPU."""
    return _cuda.stream_of(x) if _cuda.on_device(x) else None


def _build_tag() -> str:
    """A digest of this installation of luspo-rs: its Python sources and
    its native module's size and time. Every op call under torch.compile
    passes it (``build=BUILD``), so it is in the traced graph: torch's
    compile caches key a graph by its code, not by a custom op's autograd
    formula or fake kernel, and would otherwise replay an older build's."""
    import hashlib
    import pathlib

    h = hashlib.sha256()
    try:
        pkg = pathlib.Path(__file__).parent
        for p in sorted(pkg.glob("*.py")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        st = pathlib.Path(_core.__file__).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:  # pragma: no cover - sources not on a file system
        h.update(getattr(_core, "__version__", "unknown").encode())
    return h.hexdigest()[:16]


#: See :func:`_build_tag`.
BUILD = _build_tag()


def register_loss_autograd(op, wrt: int) -> None:
    """The autograd formula of a loss's ``torch.library`` op whose last output
    is the final ``d loss / d (input wrt)`` the native call wrote: only that
    output is saved, and backward returns it times the loss's grad_output
    (out of place), in the gradient's dtype; the other inputs get None."""

    def setup(ctx, inputs, output, keyword_only_inputs=None):
        ctx.save_for_backward(output[-1])
        ctx.n_inputs = len(inputs)

    def backward(ctx, grad_loss, *_other_grads):
        (grad,) = ctx.saved_tensors
        out = [None] * ctx.n_inputs
        out[wrt] = _grad_times_op(grad, grad_loss)
        return tuple(out)

    op.register_autograd(backward, setup_context=setup)


@torch.library.custom_op("luspo_rs::grad_times", mutates_args=())
def _grad_times_op(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad * grad_output`` in ``grad``'s dtype, out of place: the losses'
    ops' backward. On the CPU the native scale (rayon, into a reused
    huge-page buffer): as a torch multiply in a compiled graph, it cost a
    fresh 8 MB allocation's page faults and an OpenMP team that contends with
    the rayon pool, more than the whole fused loss."""
    if _cuda.on_device(grad):
        return (grad * grad_output).to(grad.dtype)
    out = empty_host(tuple(grad.shape), grad.dtype)
    _core.grad_times(grad.contiguous(), grad_output.detach().to("cpu"), out)
    return out


@_grad_times_op.register_fake
def _(grad, grad_output):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def loss_buffers(x: torch.Tensor, loss_dtype: torch.dtype, metrics: bool):
    """What one loss call writes, allocated by torch on ``x``'s device:
    ``grad`` (``x``'s shape and dtype; on the CPU from the huge-page pool),
    the 0-d ``loss`` in ``loss_dtype``, the float64 ``metrics`` (policy loss
    only), and the CUDA kernels' float64 ``scratch`` (None on the CPU)."""
    device = x.device
    if _cuda.on_device(x):
        grad = torch.empty(x.shape, dtype=x.dtype, device=device)
        rows = x.shape[0] if x.dim() > 0 else 0
        scratch = torch.empty(_core.loss_scratch_len(rows), dtype=torch.float64, device=device)
    else:
        grad, scratch = empty_host(tuple(x.shape), x.dtype), None
    loss = torch.empty((), dtype=loss_dtype, device=device)
    out = torch.empty(_core.METRICS_LEN, dtype=torch.float64, device=device) if metrics else None
    return grad, loss, out, scratch
