"""Fused normalisation epilogues of a routed block (RoutedBottleneck's fast path).

In a routed ResNeXt bottleneck the BatchNorm/ReLU after the first two convs and
the GroupNorm + shortcut + ReLU after the last one are separate full-size passes
in PyTorch (three to four tensors written per norm, forward and backward).  At low
gate density they cost more than the routed convolutions themselves.  These ops
fuse each epilogue into one kernel, and the routed one touches active blocks only.

``routed_batch_norm_relu(x, gates, running_mean, running_var, weight=None,
bias=None, training=False, momentum=0.1, eps=1e-5, *, backend=None)``
    ``x`` [N, C, H, W]; ``gates`` [N, G] with G | C (block g = channels
    [g C/G, (g+1) C/G), the layout of ``routed_conv2d``'s "out"/"group" outputs);
    ``running_mean``/``running_var`` [C] or None; ``weight``/``bias`` [C] or None.
    Returns ``mask * relu(F.batch_norm(mask * x, ...))`` with ``mask[n, c] =
    gates[n, g(c)] != 0``: off blocks are treated as zeros on the way in (they
    count in the batch statistics as zeros) and come out as zeros; no gradient
    flows to the gates (the mask is a comparison) or to off blocks of ``x``.
    Arguments and the running-statistics update (in place, when ``training`` and
    running statistics are given) follow ``F.batch_norm``.  On a routed conv's
    output, whose off blocks are zero already, this equals ``relu(batch_norm(x))``
    except on the off blocks, which the next routed conv never reads; the block's
    result and every gradient except the exact router gradient of off blocks are
    unchanged (RoutedBottleneck uses it when that gradient is not asked for).
``group_norm_add_relu(x, residual, num_groups, weight=None, bias=None, eps=1e-5,
*, backend=None)``
    ``relu(F.group_norm(x, num_groups, weight, bias, eps) + residual)``; ``x`` and
    ``residual`` [N, C, H, W] of one shape; gradients for all four tensors.

Both take ``inplace=True`` for inference: the result overwrites ``x`` (returned),
which saves allocating the output (on CPU, its first-touch page faults cost about
as much as the kernel).  Not allowed while autograd would need ``x`` (grad mode on
and x, weight or bias requiring grad): ValueError.

dtypes: anything ``F.batch_norm``/``F.group_norm`` takes; output dtype = x's.

Backends (``backend=None`` picks automatically, see ``fastmod.backends``):

* ``"reference"``: the PyTorch expressions above.
* ``"cpu"`` (``fastmod._C``, csrc/fused_norm/fused_norm_cpu.cpp): float32 tensors
  (x, residual, weight, bias, running statistics).  One kernel per direction;
  backward saves x and the per-channel (per-group) statistics, plus the output for
  ``group_norm_add_relu`` (its ReLU mask).
* ``"triton"`` (``fastmod.kernels.fused_norm``; CUDA tensors, or CPU ones under
  ``TRITON_INTERPRET=1``): float32, float16 and bfloat16, float32 arithmetic; the
  same saved tensors.  The routed BN takes a statistics pass and an apply pass,
  each loading gated-on rows only; the GroupNorm one program per (sample, group).

Other dtypes (float64; float16/bfloat16 on the CPU) run the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmod import _checks, _extension, backends
from fastmod.ops import _eager
from fastmod.ops.routed_conv import _block_scale

_IMPLEMENTED = ("triton", "cpu")


# ---- argument checks ---------------------------------------------------------------

def _check_x4d(name: str, x) -> None:
    _checks.tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")


def _check_channel_vectors(x: torch.Tensor, **vectors) -> None:
    C = x.shape[1]
    for name, v in vectors.items():
        if v is None:
            continue
        _checks.tensor(name, v)
        if tuple(v.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) for x with {C} channels, got {tuple(v.shape)}")
    _checks.same_device(x=x, **{k: v for k, v in vectors.items() if v is not None})


def _check_inplace(inplace, *tensors) -> bool:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("inplace=True overwrites x, which autograd needs here (grad mode is on and x, "
                         "weight or bias requires grad); use inplace=False, or torch.no_grad()")
    return inplace


def _into(x: torch.Tensor, result: torch.Tensor, inplace: bool) -> torch.Tensor:
    return x.copy_(result) if inplace else result


# Tensor dtypes each kernel backend takes; others run the reference.
_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32,)}


def _kernel(backend: str | None, op: str, x: torch.Tensor, *tensors) -> str | None:
    """The kernel backend to run ("triton"/"cpu"), or None for the reference: the
    backend resolves to a kernel whose dtypes every tensor has.  An explicit
    kernel backend with other dtypes raises TypeError."""
    chosen = backends.select(op, backend, x.device, _IMPLEMENTED, cpp_op=op)
    if chosen == "reference":
        return None
    ok = _DTYPES[chosen]
    if all(t is None or t.dtype in ok for t in (x, *tensors)):
        return chosen
    if backend == chosen:
        dtypes = sorted({str(t.dtype) for t in (x, *tensors) if t is not None})
        names = ", ".join(str(d).replace("torch.", "") for d in ok)
        raise TypeError(f"{op}: backend {chosen!r} takes {names} tensors only (x, residual, weight, bias, "
                        f"running statistics), got {', '.join(dtypes)}; use backend=None to run the "
                        "reference for other dtypes")
    return None


def _op(kernel: str, name: str, inplace: bool = False):
    """torch.ops.fastmod entry of ``name`` for a kernel backend (the Triton ops carry
    a ``_triton`` suffix; in-place ops end in ``_``)."""
    return getattr(torch.ops.fastmod, name + ("_triton" if kernel == "triton" else "") + ("_" if inplace else ""))


def _call(kernel: str, name: str, inplace: bool, *args):
    """``_op(kernel, name, inplace)(*args)``; eager calls skip the torch.library
    autograd (see fastmod.ops._eager): an autograd.Function around the same
    implementation (Triton: the Python one; C++: the op below autograd), or for the
    in-place inference ops the implementation itself."""
    key = (kernel, name)
    if key not in _EAGER or torch.compiler.is_compiling():
        return _op(kernel, name, inplace)(*args)
    if inplace:
        out = _EAGER_INPLACE[key](*args)
        torch.autograd.graph.increment_version(args[0])  # as the dispatcher does for a mutated input
        return out
    return _EAGER[key].apply(*args)


def has_kernel(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether these ops would run a kernel (not the reference) on tensors like ``x``;
    modules use it to keep their plain path where fusing would only add masking."""
    return _kernel(backend, "routed_batch_norm_relu", x) is not None


# ---- routed_batch_norm_relu -----------------------------------------------------------

def _block_mask(gates: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """gates [N, G] -> 0/1 mask [N, channels, 1, 1] (gate != 0), repeated over each block."""
    return _block_scale(gates != 0, channels, dtype)


def _check_routed_bn(x, gates, running_mean, running_var, weight, bias, training, momentum, eps):
    _check_x4d("x", x)
    _checks.tensor("gates", gates)
    N, C = x.shape[:2]
    if gates.dim() != 2 or gates.shape[0] != N or gates.shape[1] < 1 or C % gates.shape[1]:
        raise ValueError(f"gates must be [N, G] with N = {N} and G dividing the {C} channels of x, "
                         f"got shape {tuple(gates.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    _check_channel_vectors(x, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias)
    _checks.same_device(x=x, gates=gates)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    return _checks.positive_finite("eps", eps)


def routed_batch_norm_relu_reference(x: torch.Tensor, gates: torch.Tensor, running_mean: torch.Tensor | None,
                                     running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None, training: bool = False,
                                     momentum: float = 0.1, eps: float = 1e-5, *, inplace: bool = False
                                     ) -> torch.Tensor:
    """Plain PyTorch ``mask * relu(F.batch_norm(mask * x, ...))``; see the module docstring."""
    eps = _check_routed_bn(x, gates, running_mean, running_var, weight, bias, training, momentum, eps)
    inplace = _check_inplace(inplace, x, weight, bias)
    mask = _block_mask(gates, x.shape[1], x.dtype)
    y = F.batch_norm(x * mask, running_mean, running_var, weight, bias, training, momentum, eps)
    return _into(x, torch.relu(y) * mask, inplace)


def _affine_or_default(x: torch.Tensor, weight, bias):
    """Missing affine parameters as the constants they stand for (no gradient)."""
    C = x.shape[1]
    w = weight if weight is not None else x.new_ones(C)
    b = bias if bias is not None else x.new_zeros(C)
    return w, b


def routed_batch_norm_relu(x: torch.Tensor, gates: torch.Tensor, running_mean: torch.Tensor | None,
                           running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
                           eps: float = 1e-5, *, inplace: bool = False, backend: str | None = None
                           ) -> torch.Tensor:
    """BatchNorm + ReLU over the gated-on blocks only; see the module docstring.

    Shapes: x [N, C, H, W], gates [N, G] (G | C), the rest [C] or None.
    Raises ValueError/TypeError naming the bad argument.
    """
    eps = _check_routed_bn(x, gates, running_mean, running_var, weight, bias, training, momentum, eps)
    inplace = _check_inplace(inplace, x, weight, bias)
    op = "routed_batch_norm_relu"
    kernel = _kernel(backend, op, x, running_mean, running_var, weight, bias)
    if x.numel() == 0 or kernel is None:
        return routed_batch_norm_relu_reference(x, gates, running_mean, running_var, weight, bias,
                                                training, momentum, eps, inplace=inplace)
    if training and x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got x of shape "
                         f"{tuple(x.shape)}")
    w, b = _affine_or_default(x, weight, bias)
    if inplace and x.is_contiguous():
        out = x
        mean, var = _call(kernel, op, True, x, gates, w, b, running_mean, running_var, training, eps)
    else:
        out, mean, var = _call(kernel, op, False, x, gates, w, b, running_mean, running_var, training, eps)
        out = _into(x, out, inplace)
    if training and running_mean is not None:
        n = x.numel() // x.shape[1]
        with torch.no_grad():  # F.batch_norm's update: unbiased variance, lerp by momentum
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
    return out


def _bn_setup(ctx, inputs, output):
    x, gates, weight, bias, running_mean, running_var, training, eps = inputs
    _out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    if not training:  # normalised with the running statistics (the Triton op returns empty ones)
        mean, var = running_mean, running_var
    ctx.save_for_backward(x, gates, weight, bias, mean, var)
    ctx.training, ctx.eps = training, eps


def _bn_backward(bwd):
    """The autograd backward, ``bwd`` the backward op (or, in eager Triton calls, its
    Python implementation)."""
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, gates, weight, bias, mean, var = ctx.saved_tensors
        gx, gw, gb = bwd(grad_out, x, gates, weight, bias, mean, var, ctx.training, ctx.eps)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, None, gw if need[2] else None, gb if need[3] else None,
                None, None, None, None)
    return backward


# ---- group_norm_add_relu --------------------------------------------------------------

def _check_gn_add_relu(x, residual, num_groups, weight, bias, eps):
    _check_x4d("x", x)
    _check_x4d("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _checks.same_dtype(x=x, residual=residual)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the {x.shape[1]} channels of x")
    _check_channel_vectors(x, weight=weight, bias=bias)
    _checks.same_device(x=x, residual=residual)
    return _checks.positive_finite("eps", eps)


def group_norm_add_relu_reference(x: torch.Tensor, residual: torch.Tensor, num_groups: int,
                                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                  eps: float = 1e-5, *, inplace: bool = False) -> torch.Tensor:
    """Plain PyTorch ``relu(F.group_norm(x, num_groups, weight, bias, eps) + residual)``."""
    eps = _check_gn_add_relu(x, residual, num_groups, weight, bias, eps)
    inplace = _check_inplace(inplace, x, weight, bias)
    return _into(x, torch.relu(F.group_norm(x, num_groups, weight, bias, eps) + residual), inplace)


def group_norm_add_relu(x: torch.Tensor, residual: torch.Tensor, num_groups: int,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        eps: float = 1e-5, *, inplace: bool = False, backend: str | None = None) -> torch.Tensor:
    """GroupNorm, + residual, ReLU in one pass; see the module docstring.

    Shapes: x, residual [N, C, H, W]; weight, bias [C] or None; num_groups | C.
    Raises ValueError/TypeError naming the bad argument.
    """
    eps = _check_gn_add_relu(x, residual, num_groups, weight, bias, eps)
    inplace = _check_inplace(inplace, x, weight, bias)
    op = "group_norm_add_relu"
    kernel = _kernel(backend, op, x, residual, weight, bias)
    if x.numel() == 0 or kernel is None:
        return group_norm_add_relu_reference(x, residual, num_groups, weight, bias, eps, inplace=inplace)
    w, b = _affine_or_default(x, weight, bias)
    if inplace and x.is_contiguous() and residual is not x:
        _call(kernel, op, True, x, residual, w, b, num_groups, eps)
        return x
    return _into(x, _call(kernel, op, False, x, residual, w, b, num_groups, eps)[0], inplace)


def _gn_setup(ctx, inputs, output):
    x, _residual, weight, _bias, num_groups, _eps = inputs
    out, mean, rstd = output
    ctx.save_for_backward(out, x, weight, mean, rstd)
    ctx.num_groups = num_groups
    ctx.mark_non_differentiable(mean, rstd)


def _gn_backward(bwd):
    """As _bn_backward, for group_norm_add_relu."""
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        out, x, weight, mean, rstd = ctx.saved_tensors
        gx, gr, gw, gb = bwd(grad_out, out, x, weight, mean, rstd, ctx.num_groups)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gr if need[1] else None, gw if need[2] else None,
                gb if need[3] else None, None, None)
    return backward


# ---- registration ------------------------------------------------------------------------

if _extension.has_op("routed_batch_norm_relu"):

    @torch.library.register_fake("fastmod::routed_batch_norm_relu")
    def _bn_fake(x, gates, weight, bias, running_mean, running_var, training, eps):
        C = x.shape[1]
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(C), x.new_empty(C)

    @torch.library.register_fake("fastmod::routed_batch_norm_relu_backward")
    def _bn_bwd_fake(grad_out, x, gates, weight, bias, mean, var, training, eps):
        C = x.shape[1]
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(C), x.new_empty(C)

    @torch.library.register_fake("fastmod::group_norm_add_relu")
    def _gn_fake(x, residual, weight, bias, num_groups, eps):
        N = x.shape[0]
        return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(N, num_groups),
                x.new_empty(N, num_groups))

    @torch.library.register_fake("fastmod::group_norm_add_relu_backward")
    def _gn_bwd_fake(grad_out, out, x, weight, mean, rstd, num_groups):
        C = x.shape[1]
        full = torch.empty_like(x, memory_format=torch.contiguous_format)
        return full, torch.empty_like(full), x.new_empty(C), x.new_empty(C)

    @torch.library.register_fake("fastmod::routed_batch_norm_relu_")
    def _bn_inplace_fake(x, gates, weight, bias, running_mean, running_var, training, eps):
        return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])

    @torch.library.register_fake("fastmod::group_norm_add_relu_")
    def _gn_inplace_fake(x, residual, weight, bias, num_groups, eps):
        return x.new_empty(x.shape[0], num_groups), x.new_empty(x.shape[0], num_groups)

    torch.library.register_autograd("fastmod::routed_batch_norm_relu",
                                    _bn_backward(torch.ops.fastmod.routed_batch_norm_relu_backward),
                                    setup_context=_bn_setup)
    torch.library.register_autograd("fastmod::group_norm_add_relu",
                                    _gn_backward(torch.ops.fastmod.group_norm_add_relu_backward),
                                    setup_context=_gn_setup)

# Eager calls (_call): (kernel, op name) -> autograd.Function, and -> the in-place
# implementation.  On the CPU the same C++ ops, below their registered autograd:
# ~20 us less host time per call forward and ~30 us forward + backward, which small
# images feel (a 7x7 BN + ReLU fwd+bwd is ~230 us in all).
_EAGER: dict = {}
_EAGER_INPLACE: dict = {}
if _extension.has_op("routed_batch_norm_relu", "CPU"):
    _below = _eager.below_autograd
    _fm = torch.ops.fastmod
    _EAGER["cpu", "routed_batch_norm_relu"] = _eager.eager_function(
        "RoutedBatchNormReluCpu", _below(_fm.routed_batch_norm_relu.default), _bn_setup,
        _bn_backward(_below(_fm.routed_batch_norm_relu_backward.default)), triton=False)
    _EAGER["cpu", "group_norm_add_relu"] = _eager.eager_function(
        "GroupNormAddReluCpu", _below(_fm.group_norm_add_relu.default), _gn_setup,
        _gn_backward(_below(_fm.group_norm_add_relu_backward.default)), triton=False)
    _EAGER_INPLACE["cpu", "routed_batch_norm_relu"] = _below(_fm.routed_batch_norm_relu_.default)
    _EAGER_INPLACE["cpu", "group_norm_add_relu"] = _below(_fm.group_norm_add_relu_.default)
if backends.triton_installed():
    from fastmod.ops import _fused_norm_triton as _triton

    _triton.routed_batch_norm_relu_triton.register_autograd(
        _bn_backward(_triton.routed_batch_norm_relu_backward_triton), setup_context=_bn_setup)
    _triton.group_norm_add_relu_triton.register_autograd(
        _gn_backward(_triton.group_norm_add_relu_backward_triton), setup_context=_gn_setup)
    _EAGER["triton", "routed_batch_norm_relu"] = _eager.eager_function(
        "RoutedBatchNormReluTriton", _triton.bn_relu, _bn_setup, _bn_backward(_triton.bn_relu_backward))
    _EAGER["triton", "group_norm_add_relu"] = _eager.eager_function(
        "GroupNormAddReluTriton", _triton.gn_add_relu, _gn_setup, _gn_backward(_triton.gn_add_relu_backward))
    _EAGER_INPLACE["triton", "routed_batch_norm_relu"] = _eager.direct_launch(_triton.bn_relu_)
    _EAGER_INPLACE["triton", "group_norm_add_relu"] = _eager.direct_launch(_triton.gn_add_relu_)
