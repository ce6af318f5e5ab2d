"""Gumbel-sigmoid straight-through gate (issue 3). Not implemented yet."""


def gumbel_sigmoid_gate(*args, **kwargs):
    raise NotImplementedError("gumbel_sigmoid_gate: not done yet (issue 3)")


def gumbel_sigmoid_gate_reference(*args, **kwargs):
    raise NotImplementedError("gumbel_sigmoid_gate_reference: not done yet (issue 3)")
