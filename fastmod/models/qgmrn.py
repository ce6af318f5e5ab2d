"""QGMRN: Question Guided Modular Routing Networks (paper 003, sections 3.1-3.5, 4.2).

Three sub-networks:

* textual: word embeddings (uniform init) -> GRU (orthogonal init); the hidden state
  at the last real token is the question vector q [B, rnn_dim];
* routing: ``GumbelSigmoidRouter`` q -> L x M binary gates (stochastic
  Gumbel-sigmoid straight-through in ``train()``, 1[P~ > 0] in ``eval()``; bias
  initialised so every module starts executed with probability 0.7);
* visual: a ResNeXt (BRN: ``RoutedBottleneck`` layers, one gate per branch) or a
  ResNet-34 (FRN: ``RoutedBasicBlock`` layers, one gate per filter of the second
  conv) on raw pixels, each routed layer switched by its row of the gates.

Classifier (section 3.4 and 4.2): the last feature map concatenated with two
coordinate maps -> 1x1 conv + BN + ReLU -> global max pooling -> concatenated with q
-> MLP -> answer logits.  (The paper says "GMP + MLP", with the coordinates and q
sent to the classifier; it does not say where the coordinates enter, and a maximum
over a coordinate map is a constant, so a 1x1 conv mixes them in before the pooling,
as FiLM's classifier does.)

Training loss (section 3.5): the model returns ``(logits, load_weight * L_load)``,
``L_load`` being ``fastmod.ops.load_balancing_loss`` of the gates (sum over layers of
the squared coefficient of variation of the per-module loads); the paper does not
give its lambda, ``load_weight`` defaults to 0.01.  In ``eval()`` it returns the
logits alone.

Paper configuration (``fastmod.train.registry``): BRN, ResNeXt-26: a 7x7/2 conv +
3x3/2 max-pool stem, stages of depth [2, 2, 2, 2] and width [64, 128, 256, 256]
(block outputs 2 x width), cardinality 32 (8 and 16 are the paper's other
settings), GroupNorm as each block's third norm, 224 x 224 images.  FRN, ResNet-34:
the same stem, [3, 4, 6, 3] basic blocks of [64, 128, 256, 512] filters, 16 routed
layers.  Embedding 200, GRU 512, tau 1.0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastmod.models.baselines import build_mlp
from fastmod.nn import GumbelSigmoidRouter, RoutedBasicBlock, RoutedBottleneck
from fastmod.ops import load_balancing_loss

VARIANTS = ("brn", "frn")


class GruEncoder(nn.Module):
    """Question encoder of QGMRN: embedding -> GRU; the output at the last real token,
    [B, rnn_dim] (gathered at ``question_len - 1``, so the graph stays static)."""

    def __init__(self, num_tokens: int, wordvec_dim: int = 200, rnn_dim: int = 512, padding_idx: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_tokens, wordvec_dim, padding_idx=padding_idx)
        self.rnn = nn.GRU(wordvec_dim, rnn_dim, batch_first=True)
        self.out_dim = rnn_dim
        # Section 4.2: uniform embeddings, orthogonal GRU weights.
        with torch.no_grad():
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            self.embed.weight[padding_idx].zero_()
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight"):
                    for gate in p.chunk(3, 0):  # reset, update, new: one orthogonal block each
                        nn.init.orthogonal_(gate)
                else:
                    p.zero_()

    def forward(self, question: torch.Tensor, question_len: torch.Tensor) -> torch.Tensor:
        hs, _ = self.rnn(self.embed(question))
        last = (question_len.to(hs.device).long() - 1).clamp(min=0)
        return hs.gather(1, last.view(-1, 1, 1).expand(-1, 1, hs.size(2))).squeeze(1)


def coord_maps(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] -> [B, 2, H, W]: relative x and y positions in [-1, 1]."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([xs, ys], 1)


def _stem(in_channels: int, channels: int) -> nn.Sequential:
    """ResNet/ResNeXt stem: 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool (/4)."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))


class QGMRN(nn.Module):
    """Question Guided Modular Routing Network (BRN or FRN variant).

    ``forward(question [B, T] long, question_len [B] long, image [B, 3, H, W] float)``
    -> logits [B, num_answers] in eval mode, ``(logits, aux_loss)`` in train mode
    (aux_loss: the weighted load-balancing loss, a scalar).  ``last_gates`` keeps the
    last routing path [B, L, M] (BRN) or [B, 1, sum of filters] (FRN), detached.

    Args (beyond the vocabulary and answer counts and one image's shape):
        variant: "brn" (ResNeXt bottlenecks, one gate per branch) or "frn" (ResNet
            basic blocks, one gate per filter of each block's second conv).
        depths, widths: blocks per stage and each stage's width (BRN: grouped-conv
            width, block output 2 x width; FRN: filters).
        cardinality: BRN branches per block (M).
        norm3: BRN's third norm, "gn" (the paper's best) or "bn".
        stem_channels: output channels of the 7x7 stem.
        router_grad: routed convs' gate gradient, "exact" (straight-through, default)
            or "active" (off modules get none; cheaper).
    """

    def __init__(self, num_tokens: int, num_answers: int, visual_shape: Sequence[int], *, variant: str = "brn",
                 wordvec_dim: int = 200, rnn_dim: int = 512, depths: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 256), cardinality: int = 32, norm3: str = "gn",
                 stem_channels: int = 64, tau: float = 1.0, init_prob: float = 0.7, load_weight: float = 0.01,
                 classifier_proj_dim: int = 512, fc_dims: Sequence[int] = (1024,), fc_dropout: float = 0.0,
                 router_grad: str | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if len(visual_shape) != 3:
            raise ValueError(f"visual_shape must be (C, H, W), got {tuple(visual_shape)}")
        if len(depths) != len(widths) or not depths or min(depths) < 1:
            raise ValueError(f"depths and widths must be equally long, depths >= 1; got {depths}, {widths}")
        self.variant, self.load_weight = variant, float(load_weight)
        self.text = GruEncoder(num_tokens, wordvec_dim, rnn_dim)
        self.stem = _stem(visual_shape[0], stem_channels)
        self.blocks = nn.ModuleList()
        self.modules_per_layer: list[int] = []
        c = stem_channels
        for stage, (depth, width) in enumerate(zip(depths, widths)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                if variant == "brn":
                    block = RoutedBottleneck(c, width, 2 * width, cardinality, stride, norm3, router_grad)
                    c, m = 2 * width, cardinality
                else:
                    block = RoutedBasicBlock(c, width, stride, router_grad)
                    c, m = width, width
                self.blocks.append(block)
                self.modules_per_layer.append(m)
        # BRN: L layers of M branches; FRN's layers differ in filter count, so one row
        # of all filters, split per layer.
        if variant == "brn":
            self.router = GumbelSigmoidRouter(rnn_dim, len(self.blocks), cardinality, tau, init_prob)
        else:
            self.router = GumbelSigmoidRouter(rnn_dim, 1, sum(self.modules_per_layer), tau, init_prob)
        self.proj = nn.Sequential(nn.Conv2d(c + 2, classifier_proj_dim, 1, bias=False),
                                  nn.BatchNorm2d(classifier_proj_dim), nn.ReLU(inplace=True))
        self.classifier = build_mlp(classifier_proj_dim + rnn_dim, fc_dims, num_answers, dropout=fc_dropout)
        self.last_gates: torch.Tensor | None = None

    def layer_gates(self, gates: torch.Tensor) -> list[torch.Tensor]:
        """The router's gates -> one [B, M_l] tensor per routed layer."""
        if self.variant == "brn":
            return list(gates.unbind(1))
        return list(gates[:, 0].split(self.modules_per_layer, dim=1))

    def forward(self, question: torch.Tensor, question_len: torch.Tensor, image: torch.Tensor):
        q = self.text(question, question_len)
        gates = self.router(q)
        self.last_gates = gates.detach()
        y = self.stem(image)
        for block, g in zip(self.blocks, self.layer_gates(gates)):
            y = block(y, g.to(y.dtype))
        y = self.proj(torch.cat([y, coord_maps(y)], 1))
        f = torch.amax(y, dim=(2, 3))  # global max pooling
        logits = self.classifier(torch.cat([f, q.to(f.dtype)], 1))
        if not self.training:
            return logits
        if self.variant == "brn":
            load = load_balancing_loss(gates)
        else:  # per layer: the layers have different module counts
            load = sum(load_balancing_loss(g.unsqueeze(1)) for g in self.layer_gates(gates))
        return logits, self.load_weight * load
