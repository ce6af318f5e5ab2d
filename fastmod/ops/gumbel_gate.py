"""Gumbel-sigmoid straight-through gate of QGMRN's router (paper section 3.3, Appendix B).

For logits P̃ and temperature τ, with u ~ Uniform(0, 1) and t = log u − log(1 − u)
(a Logistic(0, 1) sample):

    B̃ = sigmoid((P̃ + t) / τ)
    hard=True:  P = 1[B̃ > 0.5] = 1[P̃ + t > 0]      backward: dP̃ = dP · B̃(1 − B̃) / τ
    hard=False: P = B̃                               backward: the true gradient (the same formula)

so P is 1 with probability exactly sigmoid(P̃), whatever τ.  Deterministic calls
(evaluation) use t = 0: P = 1[P̃ > 0], gradient through sigmoid(P̃ / τ).

Noise.  The fast paths generate u inside the kernel with counter-based Philox4x32-10
keyed by a 64-bit seed taken per call from the logits' device generator (or
``generator``), so successive calls draw fresh noise and ``torch.manual_seed``
reproduces the gates.  How the seed is taken (``_next_seed``):

* C++ CPU op, and Triton under torch.compile or CUDA-graph capture: drawn with
  ``torch.randint`` into a one-element int64 tensor on the device, which the kernel
  reads (a capture or a compiled graph then draws a fresh seed at every replay;
  on a GPU that draw is a second, tiny kernel).  Eager CPU calls make the same
  draw in C++ (``gumbel_sigmoid_gate_sampled``): same seed, same generator state
  after, ~10 us less per gate than the Python-side ``torch.randint``.
* Triton, eager: a host integer, so the gate is a single launch.  On CUDA it is a
  hash of the generator's seed and Philox offset, and the offset is advanced by 4
  (one Philox call's worth, as a torch.rand of 4 elements would); on the CPU
  (Triton's interpreter) it is ``torch.randint`` on the host.

The two ways key the stream differently, so an eager call and a compiled or
captured one with the same seed draw different (equally valid) noise; each is
reproducible on its own.  Element i uses counter i // 4 and
output word i % 4 (Triton's ``tl.randint4x`` stream), mapped to
u = (r >> 9)·2⁻²³ + 2⁻²⁴ ∈ [2⁻²⁴, 1 − 2⁻²⁴]: the CPU (C++) and Triton backends
draw the same u for the same seed.  ``_noise(logits, seed)`` regenerates it, so
tests can hand it to ``gumbel_sigmoid_gate_reference(..., noise=u)``.

Saved for backward.  C++ CPU op, hard gate, gradient needed: B̃ in float32
(float64 for float64 logits), written by the forward kernel; the backward is then
one multiply, where regenerating the noise and the log/exp was half the cost of a
training step at the router's shapes.  The autograd node is C++
(csrc/gumbel_gate/gumbel_gate_autograd.cpp), because a Python wrapper cost as much
per call as the kernels there.  Under ``no_grad`` (or for logits without
``requires_grad``) nothing but the gate is written.  Soft gate on the CPU, and
every Triton call: the logits and the seed (the tensor, or the host integer kept on
the autograd node); the backward kernel regenerates t from the seed (Philox is cheap
and counter-based on a GPU, where the extra B̃ write would cost bandwidth), so the
forward writes only its output.
"""
from __future__ import annotations

import math

import torch

from fastmod import _checks, _extension, backends
from fastmod.ops import _eager

OP = "gumbel_sigmoid_gate"
_IMPLEMENTED = ("triton", "cpu")
SEED_HIGH = 2 ** 62  # seeds are drawn in [0, 2^62): plenty of key space, no int64 overflow
_EPS = 2.0 ** -24    # the reference clamps u to [eps, 1 - eps], the range the kernels produce


def gumbel_sigmoid_gate_reference(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = True,
                                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch Gumbel-sigmoid gate (Appendix B), the definition the kernels are tested against.

    Args:
        logits: P̃, any shape, float16/bfloat16/float32/float64.
        tau: temperature τ > 0.
        hard: straight-through binary gate (True) or the relaxed B̃ (False).
        noise: u, Uniform(0, 1) samples broadcastable to ``logits`` (clamped to
            [2⁻²⁴, 1 − 2⁻²⁴]); None gives the deterministic gate (t = 0).

    Returns the gate in ``logits.dtype`` (computed in float32, float64 for float64
    logits).  The hard gate is ``B_binary + (B̃ − detach(B̃))``: Appendix B's
    ``B_binary − detach(B̃) + B̃`` regrouped so the forward value is exactly 0/1,
    and B_binary = 1[P̃ + t > 0], which is 1[B̃ > 0.5] without sigmoid's rounding at 0.5.
    """
    _checks.tensor("logits", logits)
    tau = _checks.positive_finite("tau", tau)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute)
    if noise is not None:
        _checks.tensor("noise", noise)
        u = noise.to(device=logits.device, dtype=compute).clamp(_EPS, 1.0 - _EPS)
        z = z + (torch.log(u) - torch.log(1.0 - u))
    soft = torch.sigmoid(z / tau)
    if not hard:
        return soft.to(logits.dtype)
    binary = (z > 0).to(compute)
    return (binary + (soft - soft.detach())).to(logits.dtype)


def gumbel_sigmoid_gate(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = True,
                        stochastic: bool | None = None, generator: torch.Generator | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """Gumbel-sigmoid straight-through gate, noise generated in the kernel.

    Args:
        logits: P̃, any shape (typically [B, L, M]), float16/bfloat16/float32
            (float64 accepted; the Triton kernel computes it in float32).
        tau: temperature τ > 0, finite.
        hard: return the binary gate P with the straight-through gradient
            B̃(1 − B̃)/τ (True), or the relaxed gate B̃ with its gradient (False).
        stochastic: draw Logistic noise (True) or use t = 0 (False).  ``None``
            means ``torch.is_grad_enabled()``: stochastic while training, and
            deterministic under ``torch.no_grad()``/``inference_mode`` (evaluation).
            Modules should pass it explicitly (the router passes ``self.training``).
        generator: a ``torch.Generator`` on the logits' device type to draw the
            seed from; default: torch's default generator for that device.
            (torch.compile needs ``generator=None``.)
        backend: ``None``/"auto", "reference", "triton" or "cpu".

    Returns a tensor of ``logits``' shape and dtype: 0/1 values (hard) or B̃.
    See the module docstring for the noise stream and what backward keeps.
    """
    _checks.tensor("logits", logits)
    tau = _checks.positive_finite("tau", tau)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    if stochastic is None:
        stochastic = torch.is_grad_enabled()
    elif not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool or None, got {type(stochastic).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits are on {logits.device}; "
                             "pass a generator of the logits' device")
    which = _select(backend, logits.device)
    if which == "reference":
        noise = None
        if stochastic:
            noise = torch.rand(logits.shape, device=logits.device, generator=generator)
        return gumbel_sigmoid_gate_reference(logits, tau, hard=hard, noise=noise)
    x = logits.contiguous()
    if which == "cpu" and stochastic and _HAS_SAMPLED and not torch.compiler.is_compiling():
        # The seed drawn in C++ (the same draw as _draw_seed): ~10 us less per gate.
        return torch.ops.fastmod.gumbel_sigmoid_gate_sampled(x, tau, hard, generator)
    seed = _next_seed(which, logits.device, generator) if stochastic else None
    if which == "cpu":
        return torch.ops.fastmod.gumbel_sigmoid_gate(x, seed, tau, hard)
    seed_tensor, host_seed = _triton_seed(seed)
    return _eager.call(torch.ops.fastmod.gumbel_sigmoid_gate_triton, _GateFunction, x, seed_tensor, tau, hard,
                       host_seed)


def _select(backend: str | None, device: torch.device) -> str:
    return backends.select(OP, backend, device, _IMPLEMENTED, cpp_op=OP)


def _draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A one-element int64 seed tensor on ``device`` (advances the generator)."""
    return torch.randint(0, SEED_HIGH, (1,), device=device, dtype=torch.int64, generator=generator)


def _next_seed(which: str, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor | int:
    """The seed of the next stochastic call on backend ``which`` (advances the generator):
    a host int for eager Triton calls, else a seed tensor (see the module docstring)."""
    if which != "triton" or torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _draw_seed(device, generator)
    if device.type != "cuda":
        return int(_draw_seed(device, generator))  # a host draw: no kernel either way
    gen = generator if generator is not None else torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()]
    offset = gen.get_offset()
    gen.set_offset(offset + 4)
    return _host_key(gen.initial_seed(), offset)


def _triton_seed(seed: torch.Tensor | int | None) -> tuple[torch.Tensor | None, int]:
    """(seed tensor, host seed) for the Triton ops: one of the two, the host seed -1
    when it is absent (a None seed: deterministic)."""
    return (None, seed) if isinstance(seed, int) else (seed, -1)


def _host_key(seed: int, offset: int) -> int:
    """A Philox key from a generator's (seed, offset): splitmix64 of the pair, put in
    [2^62, 2^63) so the kernel argument is always an int64 (Triton types a Python int
    by its value, and a second type would be a second compiled kernel)."""
    x = (seed * 0x9E3779B97F4A7C15 + offset) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return (x & (2 ** 62 - 1)) | 2 ** 62


def _noise(logits: torch.Tensor, seed: torch.Tensor | int, backend: str | None = None) -> torch.Tensor:
    """The float32 uniforms u a fast-path gate call on ``logits`` with ``seed`` (a seed
    tensor, or for Triton the host integer ``_next_seed`` gave) uses."""
    which = _select(backend, logits.device)
    logits = logits.detach()  # only its shape and device matter
    if which == "cpu":
        return torch.ops.fastmod.gumbel_sigmoid_noise(logits, seed)
    if which == "triton":
        seed_tensor, host_seed = _triton_seed(seed)
        return torch.ops.fastmod.gumbel_sigmoid_noise_triton(logits, seed_tensor, host_seed)
    raise ValueError("the reference backend draws its noise with torch.rand; there is no kernel stream to regenerate")


# ---------------------------------------------------------------------------
# torch.library registration: fake kernels and the autograd formula, shared by
# the C++ ops (fastmod._C) and the Triton ops.


def _setup_context(ctx, inputs, output):
    logits, seed, tau, _hard, *host_seed = inputs  # host_seed: the Triton ops' extra argument
    ctx.save_for_backward(logits, seed)
    ctx.tau = tau
    ctx.host_seed = host_seed


def _make_backward(backward_op):
    def backward(ctx, grad):
        logits, seed = ctx.saved_tensors
        grad_in = backward_op(grad.contiguous(), logits.contiguous(), seed, ctx.tau, *ctx.host_seed)
        return (grad_in, None, None, None) + (None,) * len(ctx.host_seed)
    return backward


# (an extension built from older sources lacks it: the Python-side draw then serves)
_HAS_SAMPLED = _extension.has_op("gumbel_sigmoid_gate_sampled")

if _extension.has_op(OP):
    @torch.library.register_fake("fastmod::gumbel_sigmoid_gate")
    def _(logits, seed, tau, hard):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastmod::gumbel_sigmoid_gate_backward")
    def _(grad, logits, seed, tau):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastmod::gumbel_sigmoid_gate_hard_train")
    def _(logits, seed, tau):
        soft_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return (torch.empty_like(logits, memory_format=torch.contiguous_format),
                torch.empty(logits.shape, dtype=soft_dtype, device=logits.device))

    @torch.library.register_fake("fastmod::gumbel_sigmoid_gate_backward_soft")
    def _(grad, soft, tau):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastmod::gumbel_sigmoid_noise")
    def _(logits, seed):
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)

    # The C++ op's autograd is a C++ kernel (csrc/gumbel_gate/gumbel_gate_autograd.cpp):
    # a Python wrapper cost as much per call as the kernels at the router's shapes.
    # An extension built without it gets the same formula from Python.
    if not _extension.has_op(OP, "Autograd"):
        torch.library.register_autograd(
            "fastmod::gumbel_sigmoid_gate",
            _make_backward(lambda *a: torch.ops.fastmod.gumbel_sigmoid_gate_backward(*a)),
            setup_context=_setup_context)


if backends.triton_installed():
    from fastmod.kernels import gumbel_gate as _kernels

    def _grid(n):
        return (max(1, math.ceil(n / _kernels.block_for(n))),)

    def _seed_args(seed, host_seed, logits):
        """(seed_ptr, seed_val, SEED_FROM_PTR, STOCHASTIC) for a kernel launch.  The seed
        is the tensor ``seed`` if given, else ``host_seed`` if >= 0, else none (t = 0).
        Triton needs some pointer when the tensor is absent: ``logits``, never read."""
        if seed is not None:
            return seed, 0, True, True
        return logits, max(host_seed, 0), False, host_seed >= 0

    def _gate_fwd(logits: torch.Tensor, seed: torch.Tensor | None, tau: float, hard: bool,
                  host_seed: int = -1) -> torch.Tensor:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        n = logits.numel()
        ptr, val, from_ptr, stochastic = _seed_args(seed, host_seed, logits)
        torch.library.wrap_triton(_kernels.gate_fwd_kernel)[_grid(n)](
            logits, ptr, val, out, n, 1.0 / tau,
            HARD=hard, STOCHASTIC=stochastic, SEED_FROM_PTR=from_ptr, BLOCK=_kernels.block_for(n))
        return out

    def _gate_bwd(grad: torch.Tensor, logits: torch.Tensor, seed: torch.Tensor | None,
                  tau: float, host_seed: int = -1) -> torch.Tensor:
        grad_in = torch.empty_like(logits, memory_format=torch.contiguous_format)
        n = logits.numel()
        ptr, val, from_ptr, stochastic = _seed_args(seed, host_seed, logits)
        torch.library.wrap_triton(_kernels.gate_bwd_kernel)[_grid(n)](
            grad, logits, ptr, val, grad_in, n, 1.0 / tau,
            STOCHASTIC=stochastic, SEED_FROM_PTR=from_ptr, BLOCK=_kernels.block_for(n))
        return grad_in

    # Registered for torch.compile; eager calls take _GateFunction (same code, no dispatch).
    _gate_triton = torch.library.triton_op("fastmod::gumbel_sigmoid_gate_triton", mutates_args=())(_gate_fwd)
    _gate_backward_triton = torch.library.triton_op("fastmod::gumbel_sigmoid_gate_backward_triton",
                                                    mutates_args=())(_gate_bwd)
    _GateFunction = _eager.eager_function("_GateFunction", _gate_fwd, _setup_context, _make_backward(_gate_bwd))

    @torch.library.triton_op("fastmod::gumbel_sigmoid_noise_triton", mutates_args=())
    def _noise_triton(logits: torch.Tensor, seed: torch.Tensor | None, host_seed: int = -1) -> torch.Tensor:
        if seed is None and host_seed < 0:
            raise ValueError("gumbel_sigmoid_noise_triton needs a seed tensor or a host_seed >= 0")
        u = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        n = logits.numel()
        ptr, val, from_ptr, _ = _seed_args(seed, host_seed, logits)
        torch.library.wrap_triton(_kernels.noise_kernel)[_grid(n)](
            ptr, val, u, n, SEED_FROM_PTR=from_ptr, BLOCK=_kernels.block_for(n))
        return u

    _gate_triton.register_autograd(_make_backward(_gate_backward_triton), setup_context=_setup_context)
