"""Gumbel-sigmoid straight-through gate of QGMRN's router (paper section 3.3, Appendix B).

For logits P̃ and temperature τ, with u ~ Uniform(0, 1) and t = log u − log(1 − u)
(a Logistic(0, 1) sample):

    B̃ = sigmoid((P̃ + t) / τ)
    hard=True:  P = 1[B̃ > 0.5] = 1[P̃ + t > 0]      backward: dP̃ = dP · B̃(1 − B̃) / τ
    hard=False: P = B̃                               backward: the true gradient (the same formula)

so P is 1 with probability exactly sigmoid(P̃), whatever τ.  Deterministic calls
(evaluation) use t = 0: P = 1[P̃ > 0], gradient through sigmoid(P̃ / τ).

Noise.  The fast paths generate u inside the kernel with counter-based Philox4x32-10
keyed by a 64-bit seed; the seed is drawn per call with ``torch.randint`` from the
logits' device generator (or ``generator``), so successive calls draw fresh noise
and ``torch.manual_seed`` reproduces the gates.  Element i uses counter i // 4 and
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
every Triton call: the logits and the one-element seed tensor; the backward kernel
regenerates t from the seed (Philox is cheap and counter-based on a GPU, where the
extra B̃ write would cost bandwidth), so the forward writes only its output.
"""
from __future__ import annotations

import math

import torch

from fastmod import _checks, _extension, backends

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
    seed = _draw_seed(logits.device, generator) if stochastic else None
    x = logits.contiguous()
    if which == "cpu":
        return torch.ops.fastmod.gumbel_sigmoid_gate(x, seed, tau, hard)
    return torch.ops.fastmod.gumbel_sigmoid_gate_triton(x, seed, tau, hard)


def _select(backend: str | None, device: torch.device) -> str:
    return backends.select(OP, backend, device, _IMPLEMENTED, cpp_op=OP)


def _draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """The one-element int64 seed tensor a stochastic call uses (advances the generator)."""
    return torch.randint(0, SEED_HIGH, (1,), device=device, dtype=torch.int64, generator=generator)


def _noise(logits: torch.Tensor, seed: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The float32 uniforms u a fast-path gate call on ``logits`` with ``seed`` uses."""
    which = _select(backend, logits.device)
    logits = logits.detach()  # only its shape and device matter
    if which == "cpu":
        return torch.ops.fastmod.gumbel_sigmoid_noise(logits, seed)
    if which == "triton":
        return torch.ops.fastmod.gumbel_sigmoid_noise_triton(logits, seed)
    raise ValueError("the reference backend draws its noise with torch.rand; there is no kernel stream to regenerate")


# ---------------------------------------------------------------------------
# torch.library registration: fake kernels and the autograd formula, shared by
# the C++ ops (fastmod._C) and the Triton ops.


def _setup_context(ctx, inputs, output):
    logits, seed, tau, _hard = inputs
    ctx.save_for_backward(logits, seed)
    ctx.tau = tau


def _make_backward(backward_op):
    def backward(ctx, grad):
        logits, seed = ctx.saved_tensors
        return backward_op(grad.contiguous(), logits.contiguous(), seed, ctx.tau), None, None, None
    return backward


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
        return (max(1, math.ceil(n / _kernels.BLOCK)),)

    def _seed_or_dummy(seed, logits):
        # Triton needs a pointer even in deterministic mode (never read then).
        return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=logits.device)

    @torch.library.triton_op("fastmod::gumbel_sigmoid_gate_triton", mutates_args=())
    def _gate_triton(logits: torch.Tensor, seed: torch.Tensor | None, tau: float, hard: bool) -> torch.Tensor:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        n = logits.numel()
        torch.library.wrap_triton(_kernels.gate_fwd_kernel)[_grid(n)](
            logits, _seed_or_dummy(seed, logits), out, n, 1.0 / tau,
            HARD=hard, STOCHASTIC=seed is not None, BLOCK=_kernels.BLOCK)
        return out

    @torch.library.triton_op("fastmod::gumbel_sigmoid_gate_backward_triton", mutates_args=())
    def _gate_backward_triton(grad: torch.Tensor, logits: torch.Tensor, seed: torch.Tensor | None,
                              tau: float) -> torch.Tensor:
        grad_in = torch.empty_like(logits, memory_format=torch.contiguous_format)
        n = logits.numel()
        torch.library.wrap_triton(_kernels.gate_bwd_kernel)[_grid(n)](
            grad, logits, _seed_or_dummy(seed, logits), grad_in, n, 1.0 / tau,
            STOCHASTIC=seed is not None, BLOCK=_kernels.BLOCK)
        return grad_in

    @torch.library.triton_op("fastmod::gumbel_sigmoid_noise_triton", mutates_args=())
    def _noise_triton(logits: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        u = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        n = logits.numel()
        torch.library.wrap_triton(_kernels.noise_kernel)[_grid(n)](seed, u, n, BLOCK=_kernels.BLOCK)
        return u

    _gate_triton.register_autograd(_make_backward(_gate_backward_triton), setup_context=_setup_context)
