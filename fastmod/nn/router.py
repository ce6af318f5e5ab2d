"""GumbelSigmoidRouter (issue 3). Not implemented yet."""
import torch


class GumbelSigmoidRouter(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GumbelSigmoidRouter: not done yet (issue 3)")
