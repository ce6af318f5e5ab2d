"""Triton kernels of the Gumbel-sigmoid straight-through gate (fastmod.ops.gumbel_gate).

One launch forward, one backward; 1-D grid, BLOCK elements per program.  Noise:
``tl.randint4x(seed, i // 4)`` word ``i % 4`` -> u = (r >> 9)·2⁻²³ + 2⁻²⁴, the stream
the C++ CPU kernel reproduces bit for bit.  Everything is computed in float32.

The seed comes either from a one-element int64 tensor on the device (``SEED_FROM_PTR``:
under torch.compile and CUDA-graph capture, where a host value would be baked in) or
as a host integer argument (eager calls: no seed-drawing kernel before the gate).
``seed_val`` is never specialised on, so every host seed runs the same compiled kernel.
"""
import triton
import triton.language as tl

BLOCK = 1024       # elements per program on large inputs
MIN_BLOCK = 128    # ... and the smallest block, one element per thread (4 warps)
MIN_PROGRAMS = 256  # halve the block (down to MIN_BLOCK) while fewer programs than this


def block_for(n: int) -> int:
    """Elements per program for n elements.  The router's gates are small (64x8x32 =
    16K elements: 16 programs of 1024 would run on 16 of an H100's 132 SMs, each
    thread walking 8 Philox draws in sequence), so small inputs get smaller blocks.
    The noise stream does not depend on the block (element i: counter i // 4)."""
    block = BLOCK
    while block > MIN_BLOCK and n < MIN_PROGRAMS * block:
        block //= 2
    return block


@triton.jit
def _uniform(seed_ptr, seed_val, pid, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """u for elements [pid * BLOCK, (pid + 1) * BLOCK), in (0, 1) strictly."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    else:
        seed = seed_val
    ctr = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    # element 4c + k takes word k of counter c
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return (r >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08


@triton.jit
def _pre_activation(x_ptr, seed_ptr, seed_val, pid, offs, mask, STOCHASTIC: tl.constexpr,
                    SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """z = logits + t (t = 0 when deterministic), float32."""
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if STOCHASTIC:
        u = _uniform(seed_ptr, seed_val, pid, SEED_FROM_PTR, BLOCK)
        z = z + tl.log(u / (1.0 - u))
    return z


@triton.jit(do_not_specialize=["seed_val"])
def gate_fwd_kernel(x_ptr, seed_ptr, seed_val, out_ptr, n, inv_tau, HARD: tl.constexpr, STOCHASTIC: tl.constexpr,
                    SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = _pre_activation(x_ptr, seed_ptr, seed_val, pid, offs, mask, STOCHASTIC, SEED_FROM_PTR, BLOCK)
    if HARD:
        out = tl.where(z > 0.0, 1.0, 0.0)  # == sigmoid(z / tau) > 0.5, without rounding at 0.5
    else:
        w = z * inv_tau
        e = tl.exp(-tl.abs(w))  # in (0, 1]: no overflow, 0 at |w| = inf
        d = 1.0 / (1.0 + e)
        out = tl.where(w >= 0.0, d, e * d)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_val"])
def gate_bwd_kernel(g_ptr, x_ptr, seed_ptr, seed_val, gin_ptr, n, inv_tau, STOCHASTIC: tl.constexpr,
                    SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = _pre_activation(x_ptr, seed_ptr, seed_val, pid, offs, mask, STOCHASTIC, SEED_FROM_PTR, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # s(1 - s) = e / (1 + e)^2 with e = exp(-|w|): no cancellation, 0 at |w| = inf
    e = tl.exp(-tl.abs(z * inv_tau))
    d = 1.0 / (1.0 + e)
    tl.store(gin_ptr + offs, (g * (e * d * d * inv_tau)).to(gin_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_val"])
def noise_kernel(seed_ptr, seed_val, u_ptr, n, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(u_ptr + offs, _uniform(seed_ptr, seed_val, pid, SEED_FROM_PTR, BLOCK), mask=offs < n)
