"""Public ops.  Each has a plain-PyTorch ``*_reference`` beside it and one
dispatch point that picks a kernel backend (see ``fastmod.backends``)."""
from fastmod.ops.mixed_node import OP_NAMES, mixed_node, mixed_node_reference, mixed_node_weights
from fastmod.ops.gumbel_gate import gumbel_sigmoid_gate, gumbel_sigmoid_gate_reference
from fastmod.ops.load_balancing import load_balancing_loss
from fastmod.ops.fused_norm import (group_norm_add_relu, group_norm_add_relu_reference,
                                     routed_batch_norm_relu, routed_batch_norm_relu_reference)
from fastmod.ops.routed_conv import routed_conv2d, routed_conv2d_reference
from fastmod.ops.routed_conv_gn import (routed_conv2d_group_norm_add_relu,
                                        routed_conv2d_group_norm_add_relu_reference)
from fastmod.ops.routed_bottleneck import routed_bottleneck_gn, routed_bottleneck_gn_reference

__all__ = [
    "OP_NAMES",
    "mixed_node",
    "mixed_node_reference",
    "mixed_node_weights",
    "gumbel_sigmoid_gate",
    "gumbel_sigmoid_gate_reference",
    "load_balancing_loss",
    "routed_conv2d",
    "routed_conv2d_reference",
    "routed_batch_norm_relu",
    "routed_batch_norm_relu_reference",
    "group_norm_add_relu",
    "group_norm_add_relu_reference",
    "routed_conv2d_group_norm_add_relu",
    "routed_conv2d_group_norm_add_relu_reference",
    "routed_bottleneck_gn",
    "routed_bottleneck_gn_reference",
]
