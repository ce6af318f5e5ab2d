"""``MixedNode``: a bank of LNMN nodes with learnable architecture weights."""
from __future__ import annotations

import torch

from fastmod import ops
from fastmod.nn._switch import KernelSwitch


class MixedNode(KernelSwitch, torch.nn.Module):
    """K LNMN nodes ``O_k(x1, x2) = sum_i w_ki * op_i(x1, x2)`` run in one launch.

    Args:
        num_nodes: K.  With K == 1, ``alpha`` has shape ``[6]`` and inputs are a
            single node's ``[B, C, ...]`` tensors; with K > 1, ``alpha`` is
            ``[K, 6]`` and inputs broadcast to ``[K, B, C, ...]``.
        normalize: L2-normalise each node's output over channels (the authors'
            code does this after every node).

    Attributes:
        alpha: parameter, zeros at init (uniform op weights), float32.
        mode: ``"soft"`` (softmax weights, training) or ``"hard"`` (one-hot at
            argmax, the paper's hard-max inference).
        op_mask: bool buffer ``[6]``; False switches an op off (ablation).
        use_kernels: False runs the PyTorch reference (also ``FASTMOD_KERNELS=0``).

    ``forward(x1, x2)`` returns the broadcast shape in the inputs' dtype.
    """

    def __init__(self, num_nodes: int = 1, *, normalize: bool = False):
        super().__init__()
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        self.num_nodes = num_nodes
        self.normalize = normalize
        self.mode = "soft"
        shape = (len(ops.OP_NAMES),) if num_nodes == 1 else (num_nodes, len(ops.OP_NAMES))
        self.alpha = torch.nn.Parameter(torch.zeros(shape))
        self.register_buffer("op_mask", torch.ones(len(ops.OP_NAMES), dtype=torch.bool))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return ops.mixed_node(x1, x2, self.alpha, mode=self.mode, op_mask=self.op_mask,
                              normalize=self.normalize, backend=self.backend)

    def weights(self) -> torch.Tensor:
        """Current op weights, ``alpha``'s shape (after mode and op_mask)."""
        return ops.mixed_node_weights(self.alpha, self.mode, self.op_mask)

    def dominant_ops(self) -> list[str] | str:
        """Name of the highest-weight op of each node (a str when K == 1)."""
        idx = self.weights().detach().argmax(dim=-1)
        names = [ops.OP_NAMES[i] for i in idx.reshape(-1).tolist()]
        return names[0] if self.num_nodes == 1 else names

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}, normalize={self.normalize}, mode={self.mode!r}"
