"""Drop-in ``nn.Module``s.  Every module has ``use_kernels`` (default True;
``FASTMOD_KERNELS=0`` turns kernels off everywhere) and the same state dict
either way; ``set_use_kernels(model, on)`` sets it throughout a network."""
from fastmod.nn._switch import set_use_kernels
from fastmod.nn.mixed_node import MixedNode
from fastmod.nn.router import GumbelSigmoidRouter
from fastmod.nn.routed_conv import RoutedBasicBlock, RoutedBottleneck, RoutedConv2d

__all__ = ["MixedNode", "GumbelSigmoidRouter", "RoutedConv2d", "RoutedBottleneck", "RoutedBasicBlock", "set_use_kernels"]
