"""Drop-in ``nn.Module``s.  Every module has ``use_kernels`` (default True;
``FASTMOD_KERNELS=0`` turns kernels off everywhere) and the same state dict
either way."""
from fastmod.nn.mixed_node import MixedNode
from fastmod.nn.router import GumbelSigmoidRouter
from fastmod.nn.routed_conv import RoutedBasicBlock, RoutedBottleneck, RoutedConv2d

__all__ = ["MixedNode", "GumbelSigmoidRouter", "RoutedConv2d", "RoutedBottleneck", "RoutedBasicBlock"]
