"""QGMRN load-balancing loss (issue 3). Not implemented yet."""


def load_balancing_loss(*args, **kwargs):
    raise NotImplementedError("load_balancing_loss: not done yet (issue 3)")
