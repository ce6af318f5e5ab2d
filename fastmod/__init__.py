"""fastmod: fused kernels and drop-in modules for modular visual-reasoning networks.

    import fastmod
    out = fastmod.ops.mixed_node(x1, x2, alpha)          # LNMN's six-op node
    gates = fastmod.ops.gumbel_sigmoid_gate(logits)       # QGMRN's router gate
    y = fastmod.ops.routed_conv2d(x, w, gates, groups=8)  # skips gated-off branches

Set ``FASTMOD_KERNELS=0`` to run everything on the plain-PyTorch references.
"""
from fastmod import backends, nn, ops  # noqa: F401

__version__ = "0.1.0"
__all__ = ["ops", "nn", "backends", "__version__"]
