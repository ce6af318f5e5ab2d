"""Block-sparse routed convolution (issue 4). Not implemented yet."""


def routed_conv2d(*args, **kwargs):
    raise NotImplementedError("routed_conv2d: not done yet (issue 4)")


def routed_conv2d_reference(*args, **kwargs):
    raise NotImplementedError("routed_conv2d_reference: not done yet (issue 4)")
