"""Alignment facts the host knows and Triton cannot see.

Triton learns from a launch's integer arguments only whether each is 1 or a
multiple of 16.  A spatial size like S = 14 * 14 = 196 is a multiple of 4, so
rows of S float32 values start 16-byte aligned, but the compiler cannot tell and
loads them 4 bytes at a time.  The host computes a power of two that divides the
sizes (``pow2_divisor``) and passes it as a constexpr; the kernel rewrites each
size with ``known_multiple``, whose ``x // A * A`` carries the fact into Triton's
analysis (``tl.multiple_of`` on a kernel argument is dropped).
"""
import triton
import triton.language as tl


def pow2_divisor(*values: int, cap: int = 16) -> int:
    """The largest power of two up to ``cap`` dividing every value (0 divides nothing
    out: it is a multiple of everything)."""
    a = cap
    while a > 1 and any(v % a for v in values):
        a //= 2
    return a


@triton.jit
def known_multiple(x, A: tl.constexpr):
    """x, which the host guarantees is a multiple of A, in a form the compiler knows
    is one (free for A a power of two: a shift pair, folded where it can be)."""
    if A > 1:
        return x // A * A
    else:
        return x
