"""Block-sparse routed convolution (QGMRN's BRN/FRN): gated-off blocks cost nothing.

``routed_conv2d(x, weight, gates, bias=None, *, stride=1, padding=0, dilation=1,
groups=1, gate_on="group", router_grad=None, backend=None)``

Shapes: ``x`` [N, Cin, H, W]; ``weight`` [Cout, Cin/groups, kh, kw]; ``gates`` [N, G];
``bias`` [Cout] or None; output [N, Cout, Ho, Wo] (contiguous NCHW from the kernel
backends).  ``x``, ``weight`` and ``bias`` share one floating dtype (fp16, bf16, fp32,
fp64); ``gates`` may be any floating dtype (it is cast to x's dtype to scale blocks).

Gate modes (block g of sample n is skipped entirely when ``gates[n, g] == 0``;
any other value scales the block):

* ``"group"``: needs ``groups == G``.  Output group g = gates[n, g] * (grouped conv
  of input group g, bias included), i.e. a ResNeXt branch.
* ``"out"``: needs ``groups == 1`` and G | Cout.  Output channels split into G
  contiguous blocks; block g = gates[n, g] * (conv(x[n], W[block g]) + bias[block g]).
  G = Cout is FRN's filter routing.
* ``"in"``: needs ``groups == 1`` and G | Cin.  out[n] = sum_g gates[n, g] *
  conv(x[n, block g], W[:, block g]) + bias; the bias is added once, ungated.

So in "group"/"out" mode the output blocks of off gates are exactly zero.

Gradients (through ``torch.library.register_autograd``): grad_input, grad_weight
and grad_bias come from the active (n, g) pairs only.  For the gates,
``router_grad="exact"`` (the default) gives the true gradient
dL/dgates[n, g] = <dL/dout, ungated output of block g>, which for off blocks costs
their forward (but no backward through them); ``router_grad="active"`` gives off
blocks a zero gate gradient and skips them completely (cheaper training step).
Measured on the CPU kernels (benchmarks/results/routed_conv_cpu.md, N = 8): at
gate density 0.1 a training step with "exact" costs 0.27-0.52x the dense step,
with "active" 0.15-0.20x; at density 0.57, 0.39-0.97x against 0.34-0.77x.

Backends (``backend=None`` picks automatically, see ``fastmod.backends``):

* ``"reference"``: dense conv, then masking; defines the semantics.
* ``"cpu"`` (``fastmod._C``): for float32 stride-1 "same" convolutions (output
  size = input size, e.g. 3x3 with padding 1, or 1x1) on CPUs with AVX-512 or
  AVX2 + FMA, direct kernels (csrc/routed_conv/routed_conv_cpu_direct*) that read x
  and the weight rows in place and write only the active output rows: forward and
  grad_x are implicit GEMMs over register tiles of 12 rows x 32 pixels (AVX-512;
  6 x 16 on AVX2; grad_x reads the weight transposed and flipped in place),
  grad_weight sums over the pixels of active pairs only (channels-last for the
  "out" 3x3 case); no gather or scatter copies.  ``FASTMOD_ROUTED_CONV_DIRECT=avx2``
  forces the AVX2 build (measured ~1.3x slower than AVX-512 on the same CPU), ``=0``
  turns the direct kernels off.  Everything else (other dtypes and strides, older
  CPUs) runs csrc/routed_conv/routed_conv_aten.cpp: the active pairs are gathered
  into compacted sub-problems for oneDNN (one grouped convolution with one group per
  active pair for "group", one convolution per sample over the active weight rows
  for "out" or input channels for "in").  With every gate on, "out" convs run the
  dense oneDNN conv; "group" and "in" stay on the direct kernels (measured faster
  than oneDNN there).
* ``"cuda"`` (csrc/routed_conv/routed_conv_cuda.cu): CUDA kernels over a work list
  built on the device (no host synchronisation, CUDA-graph capturable):
  implicit-GEMM forward, grad_x and grad_weight that visit active blocks only,
  WMMA tensor cores for fp16/bf16 (and TF32 for fp32 when
  ``torch.backends.cudnn.allow_tf32`` allows it) on tiles at least 32 channels
  wide, SIMT kernels otherwise (narrow ResNeXt groups, float64;
  ``FASTMOD_ROUTED_CONV_TC=0`` forces SIMT everywhere).  Tested on the CPU through a
  CUDA emulator (tests/cuda_emu), and on an H100 (2026-11-27: all 482 routed-conv
  tests pass).  Timed there, they are still slower than the dense cuDNN conv + mask
  at most shapes (benchmarks/results/h100-2026-11-27), so they run only when asked
  for with ``backend="cuda"`` (or, for every automatic call, the environment
  variable ``FASTMOD_ROUTED_CONV_GPU=cuda``; ``=triton`` and ``=reference``
  likewise).  On CUDA tensors ``backend=None`` runs :func:`gpu_auto_backend`'s
  choice: "triton" for 16-bit grouped convs, measured faster than cuDNN on an
  H200, the reference (dense cuDNN conv + mask) otherwise.  (An earlier "cuda"
  backend, ATen/cuDNN on host-compacted blocks, measured slower than dense on an
  H100 and was replaced.)
* ``"triton"`` (``fastmod/ops/_routed_conv_triton.py``, ``kernels/routed_conv.py``):
  every gate mode, float16/bfloat16/float32 (float64 raises TypeError).  Implicit
  GEMMs on tensor cores (wgmma on Hopper; TF32 for fp32 when
  ``torch.backends.cudnn.allow_tf32`` allows it): "out"/"in" over a per-sample
  list of active blocks built on the device, "group" with one program per
  (pixel tile, group, sample) that returns at once for an off pair.  An NCHW x is
  read in place, and the output is NCHW, for grouped convs and for 1x1, stride-1,
  unpadded "out"/"in" convs; otherwise x is read channels-last (copied if it is
  not) and the output is a channels-last tensor.
  Backward (``_routed_conv_triton_backward``): grad_x through the same kernels for
  stride 1 (off blocks skipped), the dense vendor grad_x otherwise; the dense
  vendor grad_weight of the gated operand; gate gradients from the saved output,
  plus one more kernel call over the off blocks for ``router_grad="exact"``.
  The automatic choice on CUDA for 16-bit grouped convs, opt-in elsewhere: on an
  H200 (2026-11-27, benchmarks/results/h200-2026-11-27) the grouped 3x3 forward in
  bf16 took 0.50-0.60 of the dense cuDNN path at rho 0.57, but the fp32 cases, FRN's
  "out" convs (1.4-2.7x dense) and every fp32 training step timed (0.97-3.2x) are
  still slower than dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmod import _checks, _extension, backends
from fastmod.ops import _eager

GATE_MODES = ("group", "out", "in")
ROUTER_GRADS = (None, "exact", "active")
_IMPLEMENTED = ("cpu", "cuda", "triton")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check(x, weight, gates, bias, stride, padding, dilation, groups, gate_on, router_grad):
    """Validate the arguments; return (stride, padding, dilation) as pairs."""
    _checks.tensor("x", x)
    _checks.tensor("weight", weight)
    _checks.tensor("gates", gates)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin/groups, kh, kw], got shape {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        _checks.tensor("bias", bias)
        tensors["bias"] = bias
    _checks.same_dtype(**tensors)
    _checks.same_device(**tensors, gates=gates)
    _checks.choice("gate_on", gate_on, GATE_MODES)
    _checks.choice("router_grad", router_grad, ROUTER_GRADS)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    N, cin, H, W = x.shape
    cout, cin_g, kh, kw = weight.shape
    if groups < 1 or cin % groups or cout % groups or cin_g * groups != cin:
        raise ValueError(f"groups={groups} does not fit x with {cin} channels and weight of shape "
                         f"{tuple(weight.shape)} (need Cin = weight.shape[1] * groups, groups | Cout)")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must have shape ({cout},), got {tuple(bias.shape)}")
    if gates.dim() != 2 or gates.shape[0] != N or gates.shape[1] < 1:
        raise ValueError(f"gates must be [N, G] with N = {N} and G >= 1, got shape {tuple(gates.shape)}")
    G = gates.shape[1]
    if gate_on == "group" and G != groups:
        raise ValueError(f"gate_on='group' needs gates.shape[1] == groups, got G={G}, groups={groups}")
    if gate_on in ("out", "in") and groups != 1:
        raise ValueError(f"gate_on={gate_on!r} needs groups=1, got groups={groups}")
    if gate_on == "out" and cout % G:
        raise ValueError(f"gates.shape[1]={G} must divide the {cout} output channels (gate_on='out')")
    if gate_on == "in" and cin % G:
        raise ValueError(f"gates.shape[1]={G} must divide the {cin} input channels (gate_on='in')")
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    for size, k, s, p, d, axis in ((H, kh, *[t[0] for t in (stride, padding, dilation)], "height"),
                                    (W, kw, *[t[1] for t in (stride, padding, dilation)], "width")):
        if size + 2 * p - d * (k - 1) - 1 < 0:
            raise ValueError(f"x {axis} {size} with padding {p} is smaller than the dilated kernel "
                             f"({d * (k - 1) + 1}); the output would be empty")
    return stride, padding, dilation


def _block_scale(gates: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """gates [N, G] -> [N, channels, 1, 1], each gate repeated over its block (one copy
    kernel; repeat_interleave builds an index tensor first, several launches on a GPU,
    on every routed call)."""
    n, g = gates.shape
    return gates.to(dtype)[:, :, None].expand(n, g, channels // g).reshape(n, channels, 1, 1)


def routed_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor,
                            bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1,
                            groups: int = 1, gate_on: str = "group", router_grad: str | None = None
                            ) -> torch.Tensor:
    """Plain PyTorch: the dense convolution, masked.  Same arguments and semantics as
    :func:`routed_conv2d` (which see); computes every block, including the off ones."""
    stride, padding, dilation = _check(x, weight, gates, bias, stride, padding, dilation, groups,
                                       gate_on, router_grad)
    return _masked_dense(x, weight, gates, bias, stride, padding, dilation, groups, gate_on, router_grad)


def _masked_dense(x, weight, gates, bias, stride, padding, dilation, groups, gate_on, router_grad):
    """routed_conv2d_reference on checked arguments (stride, padding, dilation pairs)."""
    g = gates
    if router_grad == "active":  # off blocks get no gate gradient
        g = torch.where(gates != 0, gates, gates.detach())
    if gate_on == "in":
        x = x * _block_scale(g, x.shape[1], x.dtype)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return y * _block_scale(g, y.shape[1], y.dtype)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _setup_context(ctx, inputs, output):
    x, weight, gates, bias, stride, padding, dilation, groups, gate_on, exact = inputs
    need_out = ctx.needs_input_grad[2] and gate_on != "in"
    ctx.save_for_backward(x, weight, gates, bias, output if need_out else None)
    ctx.args = (stride, padding, dilation, groups, gate_on, exact)


def _backward(ctx, grad):
    x, weight, gates, bias, out = ctx.saved_tensors
    stride, padding, dilation, groups, gate_on, exact = ctx.args
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[3], need[2]]
    if not any(mask):
        return (None,) * 10
    gx, gw, gb, gg = torch.ops.fastmod.routed_conv2d_backward(
        grad, x, weight, gates, bias, out, stride, padding, dilation, groups, gate_on, mask, exact)
    return (gx if mask[0] else None, gw if mask[1] else None, gg if mask[3] else None,
            gb if mask[2] else None) + (None,) * 6


if _extension.has_op("routed_conv2d"):

    @torch.library.register_fake("fastmod::routed_conv2d")
    def _fwd_fake(x, weight, gates, bias, stride, padding, dilation, groups, gate_on, exact):
        ho = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
        wo = _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        return x.new_empty((x.shape[0], weight.shape[0], ho, wo))

    @torch.library.register_fake("fastmod::routed_conv2d_backward")
    def _bwd_fake(grad_out, x, weight, gates, bias, out, stride, padding, dilation, groups, gate_on,
                  output_mask, exact):
        return (x.new_empty(x.shape), weight.new_empty(weight.shape),
                weight.new_empty((weight.shape[0],)), gates.new_empty(gates.shape))

    torch.library.register_autograd("fastmod::routed_conv2d", _backward, setup_context=_setup_context)
    # Eager calls: the same op below its torch.library autograd, in fastmod's own
    # Function (fastmod.ops._eager), ~20-30 us less host time per call.
    _CppFunction = _eager.eager_function("RoutedConvCpp", _eager.below_autograd(torch.ops.fastmod.routed_conv2d.default),
                                         _setup_context, _backward, triton=False)


GPU_ENV = "FASTMOD_ROUTED_CONV_GPU"  # what backend=None runs on CUDA tensors


def gpu_auto_backend(dtype: torch.dtype, gate_on: str) -> str:
    """What ``backend=None`` runs on a CUDA tensor under ``FASTMOD_ROUTED_CONV_GPU=auto``
    (the default): the Triton kernels where they were measured faster than the dense
    cuDNN conv + mask, the dense path elsewhere.  On an H200 (2026-11-27,
    benchmarks/results/h200-2026-11-27) the grouped ("group") bf16 forward took
    0.50-0.60 of cuDNN's time at rho 0.57 and 0.72-0.87 at rho 1.0 at BRN's three
    shapes; fp16 runs the same tensor-core path (not timed separately).  In fp32 and
    in the "out"/"in" modes the Triton kernels were slower than cuDNN somewhere."""
    return "triton" if gate_on == "group" and dtype in (torch.float16, torch.bfloat16) else "reference"


def _select(backend: str | None, x: torch.Tensor, gate_on: str) -> str:
    device = x.device
    if backend in (None, "auto") and device.type == "cuda":
        # FASTMOD_ROUTED_CONV_GPU=reference|triton|cuda sends every automatic call (and
        # so the modules and models) to one path, e.g. to time whole networks.
        backend = backends.getenv(GPU_ENV, "auto") if backends.kernels_enabled() else "reference"
        if backend not in ("auto", "reference", "triton", "cuda"):
            raise ValueError(f"{GPU_ENV} must be auto, reference, triton or cuda, got {backend!r}")
        if backend == "auto":
            backend = gpu_auto_backend(x.dtype, gate_on)
            if not backends.available(backend, device):  # no Triton installed: the dense path
                backend = "reference"
    return backends.select("routed_conv2d", backend, device, _IMPLEMENTED, cpp_op="routed_conv2d")


def routed_conv2d(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor,
                  bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1,
                  groups: int = 1, gate_on: str = "group", router_grad: str | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Convolution whose (sample, block) pairs are switched by ``gates``; see the
    module docstring for shapes, dtypes, the three ``gate_on`` modes and
    ``router_grad`` ("exact" default, or "active").

    Raises ValueError/TypeError naming the bad argument.  ``stride``, ``padding``
    and ``dilation`` are ints or pairs (no string padding).
    """
    stride, padding, dilation = _check(x, weight, gates, bias, stride, padding, dilation, groups,
                                       gate_on, router_grad)
    chosen = _select(backend, x, gate_on)
    if chosen == "reference":  # already checked
        return _masked_dense(x, weight, gates, bias, stride, padding, dilation, groups, gate_on, router_grad)
    if chosen == "triton":
        if x.dtype == torch.float64:  # tl.dot has no float64 tensor-core path on the GPU
            raise TypeError("routed_conv2d: backend='triton' takes float16, bfloat16 or float32 x, got float64; "
                            "use backend='cuda' or 'reference'")
        from fastmod.ops import _routed_conv_triton as tri
        return _eager.call(tri.routed_conv2d_triton, tri.RoutedConvFunction, x, weight, gates, bias, list(stride),
                           list(padding), list(dilation), gate_on, router_grad != "active",
                           torch.backends.cudnn.allow_tf32)
    return _eager.call(torch.ops.fastmod.routed_conv2d, _CppFunction, x, weight, gates, bias, list(stride),
                       list(padding), list(dilation), groups, gate_on, router_grad != "active")
