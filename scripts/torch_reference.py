"""A minimal PyTorch GPT trained the way nanoGPT trains it: the second reference of
scripts/benchmark.py (beside transformers' GPTNeo), written for neo from nanoGPT's published
description (model.py / train.py), not copied from it.

    pre-LN blocks: x + attn(LN(x)), x + mlp(LN(x)); one fused q/k/v projection; causal
    F.scaled_dot_product_attention (a fused kernel on every device); GELU MLP of 4 x n_embd;
    learned positions; tied input/output embeddings; no biases (nanoGPT's `bias=False`);
    AdamW with weight decay on matrices only (fused on CUDA), global-norm clipping,
    zero_grad(set_to_none=True); warm-up then cosine learning rate (nanoGPT's get_lr);
    bfloat16 by torch.autocast (on CPU too), float32 master weights.

Every local layer of GPT-Neo is a full causal layer here (nanoGPT has no local attention):
at T <= the window (256) the two compute the same thing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn_out = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp_out = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)  # [b, t, d] each
        q, k, v = (a.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, t, d_head]
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """GPT-2-style decoder; forward(tokens [b, t], targets [b, t]) -> mean cross-entropy."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, n_ctx: int, n_vocab: int, bias: bool = False):
        super().__init__()
        self.wte = nn.Embedding(n_vocab, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, n_vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():  # nanoGPT's init: N(0, 0.02), residual outputs scaled
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: str) -> torch.optim.AdamW:
    """AdamW, decaying matrices only (not norms, biases); fused on CUDA as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device == "cuda")


def nanogpt_lr(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine down to `min_lr` at `decay_steps`."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_step(model: NanoGPT, opt: torch.optim.Optimizer, batch: torch.Tensor, clip: Optional[float],
               autocast: Optional[torch.dtype]) -> torch.Tensor:
    """One optimizer step on batch [b, t + 1] (inputs and shifted targets); returns the loss."""
    device = batch.device.type
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def evaluate(model: NanoGPT, batches: list, device: str, autocast: Optional[torch.dtype] = None) -> float:
    """Mean loss over batches [b, t + 1] (every batch the same size: the token mean)."""
    model.eval()
    losses = []
    for b in batches:
        b = torch.as_tensor(b, dtype=torch.long, device=device)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            losses.append(float(model(b[:, :-1], b[:, 1:])))
    model.train()
    return sum(losses) / len(losses)
