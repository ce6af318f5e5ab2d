"""Routed convolution modules (issue 4). Not implemented yet."""
import torch


class RoutedConv2d(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("RoutedConv2d: not done yet (issue 4)")


class RoutedBottleneck(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("RoutedBottleneck: not done yet (issue 4)")


class RoutedBasicBlock(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("RoutedBasicBlock: not done yet (issue 4)")
