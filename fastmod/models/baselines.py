"""The two baselines of both papers' Table 1 (Johnson et al., CLEVR, 2017):

* ``LstmModel`` ("LSTM", the blind baseline): word embeddings -> LSTM -> the
  hidden state at the last real token -> MLP -> answer scores.  It never sees
  the image, so it measures how much the questions alone give away.
* ``CnnLstmModel`` ("CNN+LSTM"): the same question encoder; image features
  from a CNN, flattened and concatenated with the question vector -> MLP.

Defaults follow clevr-iep's baselines (embedding 300, 2-layer LSTM of 256,
MLP hidden 1024; CNN on ResNet-101 conv4 features 1024x14x14 -> 1x1 conv to
512 -> 2x2 max-pool).  On raw pixels a small trainable conv stem (stride-2
3x3 conv + BatchNorm + ReLU per entry of ``stem_channels``) stands in for the
frozen ResNet.

Every model in ``fastmod`` is called as ``model(question, question_len,
visual)``: ``question`` LongTensor [B, T] (padded), ``question_len``
LongTensor [B] (>= 1), ``visual`` float [B, 3, H, W] pixels or [B, C, h, w]
features (ignored by the blind model), and returns answer logits [B, A]
(or ``(logits, aux_loss)`` when a model adds a loss term of its own).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LstmEncoder(nn.Module):
    """Question encoder: embedding -> LSTM; returns the output at the last real
    token of each question, [B, rnn_dim].  (Gathering at ``question_len - 1``
    instead of packing keeps the graph static for torch.compile.)"""

    def __init__(self, num_tokens: int, wordvec_dim: int = 300, rnn_dim: int = 256,
                 rnn_num_layers: int = 2, rnn_dropout: float = 0.0, padding_idx: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_tokens, wordvec_dim, padding_idx=padding_idx)
        self.rnn = nn.LSTM(wordvec_dim, rnn_dim, rnn_num_layers, batch_first=True,
                           dropout=rnn_dropout if rnn_num_layers > 1 else 0.0)
        self.out_dim = rnn_dim

    def forward(self, question: torch.Tensor, question_len: torch.Tensor) -> torch.Tensor:
        emb = self.embed(question)
        if emb.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
                and torch.get_autocast_dtype("cpu") == torch.float16:
            # oneDNN has no fp16 LSTM on CPU: run it in fp32 there.
            with torch.autocast("cpu", enabled=False):
                hs, _ = self.rnn(emb.float())
        else:
            hs, _ = self.rnn(emb)                                   # B x T x H
        last = (question_len.to(hs.device).long() - 1).clamp(min=0)
        idx = last.view(-1, 1, 1).expand(-1, 1, hs.size(2))
        return hs.gather(1, idx).squeeze(1)


def build_mlp(input_dim: int, hidden_dims: Sequence[int], output_dim: int,
              use_batchnorm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """clevr-iep's classifier: [Dropout] [BN] (Linear [BN] [Dropout] ReLU)* Linear."""
    layers: list[nn.Module] = []
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    if use_batchnorm:
        layers.append(nn.BatchNorm1d(input_dim))
    d = input_dim
    for h in hidden_dims:
        layers.append(nn.Linear(d, h))
        if use_batchnorm:
            layers.append(nn.BatchNorm1d(h))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.ReLU(inplace=True))
        d = h
    layers.append(nn.Linear(d, output_dim))
    return nn.Sequential(*layers)


def build_stem(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """Pixels -> features: one stride-2 3x3 conv + BN + ReLU per entry."""
    layers: list[nn.Module] = []
    c = in_channels
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        c = out
    return nn.Sequential(*layers)


def build_visual_encoder(visual_shape: Sequence[int], is_pixels: bool, stem_channels: Sequence[int],
                         proj_dim: int, pooling: str) -> tuple[nn.Sequential, int]:
    """[stem on pixels] -> [1x1 conv to proj_dim + ReLU] -> [2x2 max-pool] -> flatten.
    Returns the encoder and its flattened output size (computed by a dry run)."""
    if pooling not in ("maxpool2", "none"):
        raise ValueError(f"pooling must be 'maxpool2' or 'none', got {pooling!r}")
    c = visual_shape[0]
    layers: list[nn.Module] = []
    if is_pixels and stem_channels:
        layers.append(build_stem(c, stem_channels))
        c = stem_channels[-1]
    if proj_dim > 0:
        layers += [nn.Conv2d(c, proj_dim, 1), nn.ReLU(inplace=True)]
    if pooling == "maxpool2":
        layers.append(nn.MaxPool2d(2, 2))
    layers.append(nn.Flatten())
    enc = nn.Sequential(*layers)
    with torch.no_grad():
        was_training = enc.training
        enc.eval()
        out_dim = enc(torch.zeros(1, *visual_shape)).shape[1]
        enc.train(was_training)
    return enc, out_dim


class LstmModel(nn.Module):
    """Blind baseline: question -> LSTM -> MLP -> answer logits [B, num_answers]."""

    def __init__(self, num_tokens: int, num_answers: int, *, wordvec_dim: int = 300, rnn_dim: int = 256,
                 rnn_num_layers: int = 2, rnn_dropout: float = 0.0, fc_dims: Sequence[int] = (1024,),
                 fc_use_batchnorm: bool = False, fc_dropout: float = 0.0):
        super().__init__()
        self.rnn = LstmEncoder(num_tokens, wordvec_dim, rnn_dim, rnn_num_layers, rnn_dropout)
        self.classifier = build_mlp(rnn_dim, fc_dims, num_answers, fc_use_batchnorm, fc_dropout)

    def forward(self, question, question_len, visual=None):
        return self.classifier(self.rnn(question, question_len))


class CnnLstmModel(nn.Module):
    """CNN+LSTM: concat(LSTM(question), flatten(CNN(visual))) -> MLP -> logits [B, num_answers].

    ``visual_shape`` is one sample's (C, H, W); ``is_pixels`` says whether it is an
    image (a conv stem is built) or precomputed feature maps (used directly)."""

    def __init__(self, num_tokens: int, num_answers: int, visual_shape: Sequence[int], is_pixels: bool, *,
                 wordvec_dim: int = 300, rnn_dim: int = 256, rnn_num_layers: int = 2,
                 rnn_dropout: float = 0.0, stem_channels: Sequence[int] = (64, 128, 256, 512),
                 cnn_proj_dim: int = 512, cnn_pooling: str = "maxpool2", fc_dims: Sequence[int] = (1024,),
                 fc_use_batchnorm: bool = False, fc_dropout: float = 0.0):
        super().__init__()
        if len(visual_shape) != 3:
            raise ValueError(f"visual_shape must be (C, H, W), got {tuple(visual_shape)}")
        self.rnn = LstmEncoder(num_tokens, wordvec_dim, rnn_dim, rnn_num_layers, rnn_dropout)
        self.cnn, cnn_dim = build_visual_encoder(visual_shape, is_pixels, stem_channels, cnn_proj_dim,
                                                 cnn_pooling)
        self.classifier = build_mlp(rnn_dim + cnn_dim, fc_dims, num_answers, fc_use_batchnorm, fc_dropout)

    def forward(self, question, question_len, visual):
        q = self.rnn(question, question_len)
        v = self.cnn(visual)
        return self.classifier(torch.cat([q, v], dim=1))
