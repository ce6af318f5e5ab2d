"""LNMN mixed node (issue 2). Being written."""
OP_NAMES = ("min", "max", "sum", "product", "choose1", "choose2")


def mixed_node(*args, **kwargs):
    raise NotImplementedError


def mixed_node_reference(*args, **kwargs):
    raise NotImplementedError


def mixed_node_weights(*args, **kwargs):
    raise NotImplementedError
