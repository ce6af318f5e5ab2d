"""LNMN's mixed node: O(x1, x2) = sum_i w_i * op_i(x1, x2) over six element-wise ops.

The public op is :func:`mixed_node`; :func:`mixed_node_reference` is the plain
PyTorch definition it must match.  The kernel backends ("triton" for CUDA,
"cpu" for the C++ kernels in ``csrc/mixed_node``) share one contract, the
canonical 4-D form built by ``fastmod.ops._mixed_node_canonical``:

* x1, x2: ``[K|1, B|1, C|1, S|1]`` views of the inputs (node, batch, channel,
  flattened spatial; size 1 on broadcast dims), any strides;
* w: ``[K, 6]`` weights (float32, float64 for float64 inputs);
* forward returns the contiguous ``[K, B, C, S]`` output, backward returns
  gradients with exactly x1's and x2's canonical shapes plus ``dw [K, 6]``.

Only x1, x2 and w are saved for backward; everything else is recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmod import _checks, _extension, backends
from fastmod.ops import _eager
from fastmod.ops._mixed_node_canonical import canonical, full4

OP_NAMES = ("min", "max", "sum", "product", "choose1", "choose2")
MODES = ("soft", "hard")
NORM_EPS = 1e-12  # F.normalize's default, which the authors' code uses
_IMPLEMENTED = ("triton", "cpu")


# --------------------------------------------------------------------------- weights
def mixed_node_weights(alpha: torch.Tensor, mode: str = "soft", op_mask=None) -> torch.Tensor:
    """Op weights of a node from its architecture parameters.

    alpha: ``[6]`` or ``[K, 6]`` floating.  ``mode="soft"``: softmax(alpha);
    ``"hard"``: one-hot at argmax(alpha) (no gradient).  ``op_mask``: bool ``[6]``
    (or ``[K, 6]``); masked ops get weight 0 and the rest are NOT renormalised
    (LNMN's operator ablation; in hard mode a masked argmax leaves the node 0).
    Returns float32 weights (float64 if alpha is float64) of alpha's shape.
    """
    _checks.tensor("alpha", alpha)
    _checks.choice("mode", mode, MODES)
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != len(OP_NAMES):
        raise ValueError(f"alpha must have shape [6] or [K, 6], got {tuple(alpha.shape)}")
    acc = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    a = alpha if alpha.dtype == acc else alpha.to(acc)
    if mode == "soft":
        w = torch.softmax(a, dim=-1)
    else:
        w = F.one_hot(a.detach().argmax(dim=-1), len(OP_NAMES)).to(acc)
    if op_mask is not None:
        w = w * _op_mask(op_mask, alpha).to(acc)
    return w


def _op_mask(op_mask, alpha: torch.Tensor) -> torch.Tensor:
    if not isinstance(op_mask, torch.Tensor):
        op_mask = torch.as_tensor(op_mask)
    if op_mask.dtype != torch.bool:
        raise TypeError(f"op_mask must be a bool tensor, got dtype {op_mask.dtype}")
    try:
        torch.broadcast_shapes(op_mask.shape, alpha.shape)
    except RuntimeError:
        raise ValueError(f"op_mask of shape {tuple(op_mask.shape)} does not broadcast to alpha's "
                         f"shape {tuple(alpha.shape)}; expected [6]") from None
    return op_mask.to(alpha.device)


# --------------------------------------------------------------------------- checks
def _check_inputs(x1, x2, alpha, mode, op_mask, normalize):
    """Validate arguments; return (K or None, full output shape, node shape)."""
    _checks.tensor("x1", x1)
    _checks.tensor("x2", x2)
    _checks.tensor("alpha", alpha)
    _checks.same_dtype(x1=x1, x2=x2)
    _checks.same_device(x1=x1, x2=x2, alpha=alpha)
    _checks.choice("mode", mode, MODES)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != len(OP_NAMES):
        raise ValueError(f"alpha must have shape [6] (one node) or [K, 6] (K nodes), got {tuple(alpha.shape)}")
    full = _checks.broadcast_shape("x1", x1, "x2", x2)
    K = None
    if alpha.dim() == 2:
        K = alpha.shape[0]
        if len(full) == 0 or full[0] not in (1, K):
            raise ValueError(f"with alpha of shape [K={K}, 6], x1 and x2 must broadcast to [K, B, ...]; "
                             f"they broadcast to {tuple(full)}")
        full = torch.Size((K,) + tuple(full[1:]))
    node_shape = full if K is None else full[1:]
    if normalize and len(node_shape) < 2:
        raise ValueError(f"normalize=True needs a channel dim: each node's tensor must be [B, C, ...], "
                         f"got node shape {tuple(node_shape)}")
    if op_mask is not None:
        _op_mask(op_mask, alpha)
    return K, full, node_shape


# --------------------------------------------------------------------------- reference
def mixed_node_reference(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, *, mode: str = "soft",
                         op_mask=None, normalize: bool = False) -> torch.Tensor:
    """Plain-PyTorch definition of :func:`mixed_node` (same arguments and result)."""
    K, full, _ = _check_inputs(x1, x2, alpha, mode, op_mask, normalize)
    w = mixed_node_weights(alpha, mode, op_mask).to(x1.dtype)
    ops = (torch.minimum(x1, x2), torch.maximum(x1, x2), x1 + x2, x1 * x2, x1, x2)
    out = torch.zeros(full, dtype=x1.dtype, device=x1.device)
    for i, op in enumerate(ops):
        wi = w[i] if K is None else w[:, i].reshape((K,) + (1,) * (len(full) - 1))
        # A zero weight removes its op entirely (0 * inf must not give NaN).
        out = out + wi * torch.where(wi != 0, op, torch.zeros((), dtype=op.dtype, device=op.device))
    if normalize:
        out = F.normalize(out, p=2, dim=1 if K is None else 2, eps=NORM_EPS)
    return out


# --------------------------------------------------------------------------- autograd (shared)
def _setup_context(ctx, inputs, output):
    x1, x2, w, normalize = inputs
    ctx.save_for_backward(x1, x2, w)
    ctx.normalize = normalize


def _autograd_backward(bwd_op):
    def backward(ctx, grad):
        x1, x2, w = ctx.saved_tensors
        need1, need2, needw = ctx.needs_input_grad[:3]
        dx1, dx2, dw = bwd_op(grad.contiguous(), x1, x2, w, ctx.normalize, need1, need2)
        # The reference's zero-weight terms are cut out of the graph: no gradient there.
        dw = torch.where(w != 0, dw, torch.zeros_like(dw)) if needw else None
        return (dx1 if need1 else None), (dx2 if need2 else None), dw, None

    return backward


# --------------------------------------------------------------------------- C++ backend
if _extension.has_op("mixed_node_fwd"):

    @torch.library.register_fake("fastmod::mixed_node_fwd")
    def _cpp_fwd_fake(x1, x2, w, normalize):
        return x1.new_empty(full4(x1, x2, w))

    @torch.library.register_fake("fastmod::mixed_node_bwd")
    def _cpp_bwd_fake(grad, x1, x2, w, normalize, need_dx1, need_dx2):
        return (x1.new_empty(x1.shape if need_dx1 else (0,)), x2.new_empty(x2.shape if need_dx2 else (0,)),
                w.new_empty(w.shape))

    torch.library.register_autograd("fastmod::mixed_node_fwd",
                                    _autograd_backward(lambda *a: torch.ops.fastmod.mixed_node_bwd(*a)),
                                    setup_context=_setup_context)
    # Eager calls: the op below its torch.library autograd (see fastmod.ops._eager).
    _CppFunction = _eager.eager_function("_MixedNodeCpp", _eager.below_autograd(torch.ops.fastmod.mixed_node_fwd.default),
                                         _setup_context, _autograd_backward(torch.ops.fastmod.mixed_node_bwd.default),
                                         triton=False)


# --------------------------------------------------------------------------- Triton backend
# The Triton op takes alpha itself (its kernels make the weights, so the forward is
# one launch) and its backward returns dalpha directly.
def _triton_setup_context(ctx, inputs, output):
    x1, x2, alpha, op_mask, hard, normalize = inputs
    ctx.save_for_backward(x1, x2, alpha, op_mask)
    ctx.hard, ctx.normalize = hard, normalize


def _triton_backward(bwd):
    def backward(ctx, grad):
        x1, x2, alpha, op_mask = ctx.saved_tensors
        need1, need2, needa = ctx.needs_input_grad[:3]
        dx1, dx2, da = bwd(grad.contiguous(), x1, x2, alpha, op_mask, ctx.hard, ctx.normalize, need1, need2, needa)
        return (dx1 if need1 else None), (dx2 if need2 else None), (da if needa and not ctx.hard else None), \
            None, None, None
    return backward


if backends.triton_installed():
    from fastmod.ops import _mixed_node_triton as _tri

    _tri.mixed_node_triton_fwd.register_autograd(_triton_backward(_tri.mixed_node_triton_bwd),
                                                 setup_context=_triton_setup_context)
    _TritonFunction = _eager.eager_function("_MixedNodeTriton", _tri.triton_fwd, _triton_setup_context,
                                            _triton_backward(_tri.triton_bwd))


def _mask_rows(op_mask, alpha2d: torch.Tensor) -> torch.Tensor | None:
    """op_mask as bool [1|K, 6] rows for the Triton kernels (None stays None)."""
    if op_mask is None:
        return None
    m = _op_mask(op_mask, alpha2d)
    if m.shape[-1] != len(OP_NAMES) or m.dim() > 2:
        m = m.expand(alpha2d.shape)
    return m.reshape(-1, len(OP_NAMES)).contiguous()


# --------------------------------------------------------------------------- public op
def mixed_node(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, *, mode: str = "soft", op_mask=None,
               normalize: bool = False, backend: str | None = None) -> torch.Tensor:
    """Fused LNMN node: ``sum_i w_i * op_i(x1, x2)``, ops = (min, max, x1+x2, x1*x2, x1, x2).

    Args:
        x1, x2: floating tensors (float16, bfloat16, float32, float64) of one
            dtype and device, broadcastable to a common shape, e.g. ``[B, D, H, W]``
            with ``[B, D, 1, 1]`` or ``[B, 1, H, W]``.  With ``alpha`` of shape
            ``[K, 6]`` they broadcast to ``[K, B, ...]`` (K nodes in one launch;
            a tensor without the K dim is shared by all nodes).
        alpha: ``[6]`` or ``[K, 6]`` architecture parameters; w = softmax(alpha)
            (``mode="soft"``) or one-hot at argmax (``mode="hard"``, no gradient).
        op_mask: optional bool ``[6]``; masked ops contribute nothing (no renormalisation).
        normalize: L2-normalise the result over the channel dim (dim 1 of each
            node's ``[B, C, ...]`` tensor) at every position, eps 1e-12, as
            ``F.normalize`` in the authors' code.
        backend: None/"auto", "reference", "triton" or "cpu" (see ``fastmod.backends``).

    Returns:
        The broadcast shape, in the inputs' dtype (fp32 arithmetic inside).
        Gradients flow to x1, x2 (summed over broadcast dims) and alpha.
        At x1 == x2, min and max pass half the gradient to each input and NaN
        propagates, as ``torch.minimum``/``torch.maximum`` do.  A weight of
        exactly 0 removes its op (so masked ops never inject inf/NaN).
    """
    K, full, node_shape = _check_inputs(x1, x2, alpha, mode, op_mask, normalize)
    chosen = backends.select("mixed_node", backend, x1.device, _IMPLEMENTED, cpp_op="mixed_node_fwd")
    if chosen == "reference":
        return mixed_node_reference(x1, x2, alpha, mode=mode, op_mask=op_mask, normalize=normalize)
    a, b = canonical(x1, node_shape), canonical(x2, node_shape)
    if chosen == "triton":
        a_acc = _acc_dtype(alpha.dtype)  # the weights' dtype, as mixed_node_weights computes them
        alpha2d = (alpha if alpha.dtype == a_acc else alpha.to(a_acc)).reshape(-1, len(OP_NAMES)).contiguous()
        if mode == "hard":
            alpha2d = alpha2d.detach()  # no gradient to alpha in hard mode
        out = _eager.call(_tri.mixed_node_triton_fwd, _TritonFunction, a, b, alpha2d, _mask_rows(op_mask, alpha2d),
                          mode == "hard", normalize)
        return out.reshape(full)
    w = mixed_node_weights(alpha, mode, op_mask)
    acc = _acc_dtype(x1.dtype)
    w = (w if w.dtype == acc else w.to(acc)).reshape(-1, len(OP_NAMES)).contiguous()
    out = _eager.call(torch.ops.fastmod.mixed_node_fwd, _CppFunction, a, b, w, normalize)
    return out.reshape(full)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
