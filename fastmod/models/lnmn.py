"""LNMN: Learnable Neural Module Networks (paper 000): Stack-NMN whose modules are
generic cells of mixed nodes (``fastmod.nn.MixedNode``, six element-wise ops
weighted by softmax(alpha)), trained DARTS-style.

Structure (paper sections 2 and 3, Algorithm 1):

* Controller: word embeddings -> bidirectional LSTM, outputs h_s [B, S, d] and the
  question vector q [B, d] (both directions' final states; no host synchronisation,
  see ``BiLstmEncoder``).  At each of T steps,
  u = W2 [W1(t) q + b1; c_(t-1)] + b2; the module weights w(t) = softmax(MLP(u));
  the textual parameter c_t = sum_s softmax_s(W3 (u * h_s)) h_s.
* A differentiable stack of L attention maps [B, L, H, W] with a soft pointer
  [B, L], started with a uniform (all-ones) map at the bottom.  Every module runs at
  every step; the next stack and pointer are the w(t)-weighted averages of each
  module's, and the pointer is sharpened, softmax(p / 0.2), as Stack-NMN does.
* Generic modules (section 3.1), each with its own 1x1 conv of the image features
  (conv1), linear map of c_t (W1) and mixed nodes:
  - attention, 3 inputs (pops 1, pushes 1; a pop at the bottom slot leaves the
    pointer there and the push moves it up, as in Stack-NMN, so the first result
    lands above the initial map): node(conv1(I), a) -> node(W1 c, .) -> 1x1 conv to
    one channel (the new map);
  - attention, 4 inputs (pops 2, pushes 1): node(a1, a2) -> node(conv1(I), .) ->
    node(W1 c, .) -> 1x1 conv;
  - answer, 3 / 4 inputs (pop 1 / 2, push an all-zero map, as Stack-NMN's answer
    modules do): the same nodes, then the node output summed over space,
    concatenated with W1 c and the previous memory, through a linear layer: the
    module's memory features;
  - NoOp: leaves stack, pointer and memory alone.
  The modules of one kind run together: their nodes at one depth are a single
  K-node mixed_node call (alpha [K, 6]).  Nodes over image-sized features are
  L2-normalised over channels (``normalize_nodes``, as the authors' code does after
  every node); the node of two single-channel attention maps is not (normalising
  one channel would leave only its sign).
* Memory: the w(t)-weighted answer modules' outputs, the previous memory carried
  through the other modules; the final memory and q -> MLP -> answer logits.

Training (Algorithm 2): the model returns ``(logits, aux)`` in train mode, with
aux = -lambda_w / T * sum_t H(w(t)) (the module-weight entropy, lambda_w annealed
from 1 to 0 over ``entropy_schedule[0]`` training steps, then to -1 over
``entropy_schedule[1]``) - lambda_op * sum over nodes of ||softmax(alpha)||_2 /
||softmax(alpha)||_1 (sparse op weights).  ``lnmn_scheme`` alternates Adam steps on
the weights and on the alphas.  One deviation: the alpha steps use training batches
(every other step), not batches drawn from the validation set.

Table 3's module counts: LNMN (9) 4/2/1/1 (attention 3-in/4-in, answer 3-in/4-in)
plus NoOp; LNMN (11) 4/2/2/2; LNMN (14) 5/4/2/2.  T = 5, L = 5, map_dim 384.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmod.models.baselines import build_mlp, build_stem
from fastmod.nn import MixedNode
from fastmod.train.optim import OptimScheme, warmup_scheduler

PTR_SHARPEN_TEMP = 0.2  # Stack-NMN's soft pointer sharpening
# (group name, kind, inputs), in the order of LNMN's ``modules`` counts (Table 3)
MODULE_KINDS = (("att3", "attention", 3), ("att4", "attention", 4), ("ans3", "answer", 3), ("ans4", "answer", 4))


def stack_read(att: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """att [B, L, H, W], ptr [B, L] -> the map under the pointer, [B, 1, H, W]."""
    return torch.einsum("blhw,bl->bhw", att, ptr).unsqueeze(1)


def ptr_push(ptr: torch.Tensor) -> torch.Tensor:
    """Move the pointer one slot up (it stays at the top slot)."""
    up = F.pad(ptr[:, :-1], (1, 0))
    return torch.cat([up[:, :-1], up[:, -1:] + ptr[:, -1:]], 1)


def ptr_pop(ptr: torch.Tensor) -> torch.Tensor:
    """Move the pointer one slot down (it stays at the bottom slot)."""
    down = F.pad(ptr[:, 1:], (0, 1))
    return torch.cat([down[:, :1] + ptr[:, :1], down[:, 1:]], 1)


class BiLstmEncoder(nn.Module):
    """Embedding -> bidirectional LSTM.  Returns (h [B, S, d], q [B, d], mask [B, S]):
    the per-token outputs (both directions), both directions' final states, the real
    tokens.  The backward direction runs over each question reversed within its own
    length (a gather on the device), so padding never enters it and nothing waits on
    the host: no packed sequences, so ``torch.compile(fullgraph=True)`` traces the
    whole model (with Dynamo's ``allow_rnn`` for the LSTMs)."""

    def __init__(self, num_tokens: int, wordvec_dim: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"lstm_dim must be even (two directions), got {dim}")
        self.embed = nn.Embedding(num_tokens, wordvec_dim, padding_idx=0)
        self.fwd = nn.LSTM(wordvec_dim, dim // 2, batch_first=True)
        self.bwd = nn.LSTM(wordvec_dim, dim // 2, batch_first=True)

    def forward(self, question: torch.Tensor, question_len: torch.Tensor):
        S = question.shape[1]
        lens = question_len.to(question.device).long().clamp(1, S)
        pos = torch.arange(S, device=question.device).expand(question.shape[0], S)
        mask = pos < lens[:, None]
        # position s <-> len - 1 - s inside each question, padding left in place
        rev = torch.where(mask, lens[:, None] - 1 - pos, pos)
        emb = self.embed(question)
        hf, _ = self.fwd(emb)
        hb_rev, _ = self.bwd(emb.gather(1, rev[..., None].expand_as(emb)))
        hb = hb_rev.gather(1, rev[..., None].expand_as(hb_rev))  # back to question order
        q = torch.cat([hf.gather(1, (lens - 1).view(-1, 1, 1).expand(-1, 1, hf.shape[2])).squeeze(1),
                       hb[:, 0]], 1)
        return torch.cat([hf, hb], 2), q, mask


class GenericModules(nn.Module):
    """K generic modules of one kind ("attention" or "answer", 3 or 4 inputs), run
    together: the nodes at each depth are one K-node mixed node.

    forward(img [B, D, H, W], maps (1 or 2 tensors [B, 1, H, W]), c [B, ctx], mem [B, D])
    -> attention: new maps [B, K, H, W]; answer: memory features [B, K, D]."""

    def __init__(self, num_modules: int, kind: str, inputs: int, map_dim: int, ctx_dim: int, normalize: bool):
        super().__init__()
        if kind not in ("attention", "answer") or inputs not in (3, 4):
            raise ValueError(f"unknown module kind {kind!r} with {inputs} inputs")
        K, D = num_modules, map_dim
        self.K, self.kind, self.inputs, self.D = K, kind, inputs, D
        self.conv1 = nn.Conv2d(D, K * D, 1)     # each module's conv1 of the image features
        self.w1 = nn.Linear(ctx_dim, K * D)     # each module's W1 of the textual parameter
        # 4 inputs: a first node over the two popped maps (single-channel: not normalised)
        self.nodes = nn.ModuleList(([MixedNode(K)] if inputs == 4 else [])
                                   + [MixedNode(K, normalize=normalize) for _ in range(2)])
        if kind == "attention":
            self.head = nn.Conv2d(K * D, K, 1, groups=K)  # each module's 1x1 conv to one channel
        else:  # each module's W2 over [sum of the node output, W1 c, previous memory]
            self.w2 = nn.Parameter(torch.randn(K, 3 * D, D) / (3 * D) ** 0.5)
            self.b2 = nn.Parameter(torch.zeros(K, 1, D))

    def _node(self, i, x1, x2):
        """Node depth i of all K modules on [K or 1, B, C, H, W] inputs -> [K, B, C, H, W]
        (one node, K = 1, takes [B, C, H, W] tensors)."""
        if self.K > 1:
            return self.nodes[i](x1, x2)
        return self.nodes[i](x1[0], x2[0]).unsqueeze(0)

    def forward(self, img, maps, c, mem):
        B, D, H, W = img.shape
        K = self.K
        feat = self.conv1(img).view(B, K, D, H, W).transpose(0, 1)   # [K, B, D, H, W]
        txt = self.w1(c).view(B, K, D).transpose(0, 1)                # [K, B, D]
        if self.inputs == 3:
            x = self._node(0, feat, maps[0].unsqueeze(0))
        else:
            x = self._node(0, maps[0].unsqueeze(0), maps[1].unsqueeze(0))  # [K, B, 1, H, W]
            x = self._node(1, feat, x)
        x = self._node(len(self.nodes) - 1, txt[..., None, None], x)     # [K, B, D, H, W]
        if self.kind == "attention":
            return self.head(x.transpose(0, 1).reshape(B, K * D, H, W))
        z = torch.cat([x.sum((3, 4)), txt, mem.unsqueeze(0).expand(K, -1, -1)], 2)  # [K, B, 3D]
        return (torch.bmm(z, self.w2) + self.b2).transpose(0, 1)                   # [B, K, D]


class LNMN(nn.Module):
    """Learnable Neural Module Network (see the module docstring).

    ``forward(question [B, T] long, question_len [B] long, visual [B, C, H, W] float)``
    -> logits [B, num_answers] in eval mode, ``(logits, aux)`` in train mode.
    ``last_module_weights`` keeps w(t) of the last call, [B, T, modules] (detached;
    module order: attention 3-in, attention 4-in, answer 3-in, answer 4-in, NoOp).

    Args (beyond the vocabulary and answer counts, one sample's visual shape and
    whether it is pixels): ``modules``: counts of attention 3-in, attention 4-in,
    answer 3-in, answer 4-in modules (Table 3); ``steps`` T; ``stack_len`` L;
    ``map_dim`` D; ``lstm_dim`` d; ``stem_channels``: stride-2 conv stem for pixels.
    """

    def __init__(self, num_tokens: int, num_answers: int, visual_shape: Sequence[int], is_pixels: bool, *,
                 modules: Sequence[int] = (4, 2, 1, 1), steps: int = 5, stack_len: int = 5, map_dim: int = 384,
                 lstm_dim: int = 512, wordvec_dim: int = 300, stem_channels: Sequence[int] = (64, 128, 256, 512),
                 normalize_nodes: bool = True, fc_dims: Sequence[int] = (512,), entropy_weight: float = 1.0,
                 entropy_schedule: Sequence[int] = (218750, 109375), sparsity_weight: float = 1.0):
        super().__init__()
        if len(visual_shape) != 3:
            raise ValueError(f"visual_shape must be (C, H, W), got {tuple(visual_shape)}")
        if len(modules) != 4 or min(modules) < 0 or sum(modules) < 1:
            raise ValueError(f"modules must be 4 counts (attention 3/4-input, answer 3/4-input), got {modules}")
        if steps < 1 or stack_len < 2:
            raise ValueError(f"steps must be >= 1 and stack_len >= 2, got {steps}, {stack_len}")
        self.T, self.L, self.D = steps, stack_len, map_dim
        self.entropy_weight, self.sparsity_weight = float(entropy_weight), float(sparsity_weight)
        self.entropy_schedule = tuple(int(s) for s in entropy_schedule)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.text = BiLstmEncoder(num_tokens, wordvec_dim, lstm_dim)
        c = visual_shape[0]
        vis: list[nn.Module] = []
        if is_pixels and stem_channels:
            vis.append(build_stem(c, stem_channels))
            c = stem_channels[-1]
        vis += [nn.Conv2d(c, map_dim, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(map_dim, map_dim, 3, padding=1), nn.ReLU(inplace=True)]
        self.visual = nn.Sequential(*vis)
        d = lstm_dim
        self.w1 = nn.ModuleList(nn.Linear(d, d) for _ in range(steps))  # W1(t)
        self.w2 = nn.Linear(2 * d, d)
        self.w3 = nn.Linear(d, 1)
        self.c_init = nn.Parameter(torch.zeros(d))
        self.groups = nn.ModuleDict()
        for (name, kind, inputs), k in zip(MODULE_KINDS, modules):
            if k:
                self.groups[name] = GenericModules(k, kind, inputs, map_dim, d, normalize_nodes)
        self.num_modules = sum(modules) + 1  # + NoOp
        self.module_mlp = build_mlp(d, [d], self.num_modules)
        self.classifier = build_mlp(map_dim + d, fc_dims, num_answers)
        self.last_module_weights: torch.Tensor | None = None

    def mixed_nodes(self) -> list[MixedNode]:
        return [m for m in self.modules() if isinstance(m, MixedNode)]

    def entropy_coefficient(self) -> float:
        """lambda_w at the current training step: 1 -> 0 over entropy_schedule[0] steps,
        then 0 -> -1 over entropy_schedule[1], then -1 (times entropy_weight)."""
        s, (a, b) = int(self.train_steps), self.entropy_schedule
        lam = 1.0 - s / a if s < a else (-(s - a) / b if s < a + b else -1.0)
        return self.entropy_weight * lam

    def forward(self, question: torch.Tensor, question_len: torch.Tensor, visual: torch.Tensor):
        hs, q, mask = self.text(question, question_len)
        img = self.visual(visual)
        B, _, H, W = img.shape
        att = img.new_zeros(B, self.L, H, W)
        att[:, 0] = 1.0                                # uniform attention at the bottom
        ptr = img.new_zeros(B, self.L)
        ptr[:, 0] = 1.0
        mem = img.new_zeros(B, self.D)
        c = self.c_init.expand(B, -1).to(q.dtype)
        weights, entropy = [], 0.0
        for t in range(self.T):
            u = self.w2(torch.cat([self.w1[t](q), c], 1))
            w = torch.softmax(self.module_mlp(u), 1)                           # [B, modules]
            logits = self.w3(u.unsqueeze(1) * hs).squeeze(2).masked_fill(~mask, float("-inf"))
            c = torch.einsum("bs,bsd->bd", torch.softmax(logits, 1), hs)
            att, ptr, mem = self._step(img, att, ptr, mem, c, w)
            weights.append(w)
            entropy = entropy - (w * torch.log(w.clamp_min(1e-12))).sum(1).mean()
        self.last_module_weights = torch.stack(weights, 1).detach()
        out = self.classifier(torch.cat([mem, q], 1))
        if not self.training:
            return out
        aux = -self.entropy_coefficient() / self.T * entropy
        if self.sparsity_weight:
            ratio = sum(torch.softmax(n.alpha, -1).norm(dim=-1).sum() for n in self.mixed_nodes())
            aux = aux - self.sparsity_weight * ratio  # ||softmax||_1 is 1
        with torch.no_grad():
            self.train_steps += 1
        return out, aux

    def _step(self, img, att, ptr, mem, c, w):
        """One time step: every module on the current stack, then the w-weighted average."""
        # Pops move the pointer down (staying at the bottom), a push moves it up and
        # writes: so a module at the bottom slot writes its map above the initial one.
        top = stack_read(att, ptr)
        popped1 = ptr_pop(ptr)
        below = stack_read(att, popped1)
        write_at = {3: ptr_push(popped1), 4: ptr_push(ptr_pop(popped1))}
        new_att = torch.zeros_like(att)
        new_ptr = torch.zeros_like(ptr)
        new_mem = torch.zeros_like(mem)
        col = 0
        for name, group in self.groups.items():
            wg = w[:, col:col + group.K]                                       # [B, K]
            col += group.K
            p = write_at[group.inputs]                                         # where the result goes
            maps = (top,) if group.inputs == 3 else (top, below)
            out = group(img, maps, c, mem)
            wsum = wg.sum(1)
            keep = att * (1 - p)[:, :, None, None]                             # the stack off the written slot
            new_att = new_att + wsum[:, None, None, None] * keep
            if group.kind == "attention":
                pushed = (wg[:, :, None, None] * out).sum(1, keepdim=True)      # [B, 1, H, W]
                new_att = new_att + pushed * p[:, :, None, None]
                new_mem = new_mem + wsum[:, None] * mem                        # memory carried through
            else:  # answer modules push a zero map and produce memory
                new_mem = new_mem + (wg[:, :, None] * out).sum(1)
            new_ptr = new_ptr + wsum[:, None] * p
        w_noop = w[:, -1]
        new_att = new_att + w_noop[:, None, None, None] * att
        new_ptr = new_ptr + w_noop[:, None] * ptr
        new_mem = new_mem + w_noop[:, None] * mem
        return new_att, torch.softmax(new_ptr / PTR_SHARPEN_TEMP, 1), new_mem


def lnmn_scheme(model: nn.Module, optim_cfg: dict) -> OptimScheme:
    """Alternating Adam steps (paper section 4): even steps the weights (optim.lr,
    optim.betas, warm-up), odd steps the mixed nodes' alphas (optim.arch)."""
    arch = [p for n, p in model.named_parameters() if n.endswith("alpha")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("alpha") and p.requires_grad]
    a = optim_cfg["arch"]
    weights = torch.optim.Adam(rest, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                               weight_decay=optim_cfg["weight_decay"])
    alphas = torch.optim.Adam(arch, lr=a["lr"], betas=tuple(a["betas"]), weight_decay=a["weight_decay"])
    sched = warmup_scheduler(weights, optim_cfg["lr"], optim_cfg["warmup_steps"], optim_cfg["warmup_start_lr"])
    return OptimScheme({"weights": weights, "arch": alphas}, {"weights": sched},
                       active=lambda step: ("weights",) if step % 2 == 0 else ("arch",))
