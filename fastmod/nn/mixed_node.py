import torch


class MixedNode(torch.nn.Module):
    pass
