"""Training the owner's FFN as a low-rank delta on the anchor's (`expert train --rank R`).

The owner's expert computes W·x + B·(A·x) per FFN matrix, W the anchor's weights (frozen), A (r, in)
and B (out, r) trained, B = 0 at step 0 so training starts from the anchor exactly (LoRA). The
delta is applied to activations, so no full-size weight gradient is ever formed: what the rank
saves is the owner's FFN weight gradients (one of the five FFN-sized matmuls per token of expert
training; scripts/bench_train.py prints the FLOP-ideal beside the measured speed). Every other
expert's FFN runs as the stock module would. `materialize` writes W + B·A back into the stock
stacked tensors, so everything after training (calibration, the package, merge) sees an
ordinary expert whose delta has rank ≤ R (`expert compress --rank R` stores it losslessly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankOwner(nn.Module):
    """Drop-in for a stock experts module (stacked gate_up_proj (E, 2I, H), down_proj (E, H, I),
    act_fn): expert `owner` gets the trainable rank-r delta, the others run unchanged. The stock
    tensors become buffers (frozen, moved with the model, never checkpointed); the stock module
    is kept outside the module tree for materialize."""

    def __init__(self, experts: nn.Module, rank: int, owner: int, generator: torch.Generator):
        super().__init__()
        self._stock = [experts]  # a list: not a submodule
        self.owner, self.rank, self.act_fn = owner, rank, experts.act_fn
        self.register_buffer("gate_up", experts.gate_up_proj.detach(), persistent=False)
        self.register_buffer("down", experts.down_proj.detach(), persistent=False)
        _, i2, h = self.gate_up.shape
        i = self.down.shape[-1]
        dev = self.gate_up.device
        self.gate_up_a = nn.Parameter(torch.randn(rank, h, generator=generator).to(dev) / h**0.5)
        self.gate_up_b = nn.Parameter(torch.zeros(i2, rank, device=dev))
        self.down_a = nn.Parameter(torch.randn(rank, i, generator=generator).to(dev) / i**0.5)
        self.down_b = nn.Parameter(torch.zeros(h, rank, device=dev))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate_up, down = self.gate_up, self.down
        out = torch.zeros_like(hidden_states)
        for e in range(gate_up.shape[0]):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = hidden_states[tok]
            h = F.linear(x, gate_up[e])
            if e == self.owner:
                h = h + F.linear(F.linear(x, self.gate_up_a), self.gate_up_b)
            g, u = h.chunk(2, dim=-1)
            y = self.act_fn(g) * u
            z = F.linear(y, down[e])
            if e == self.owner:
                z = z + F.linear(F.linear(y, self.down_a), self.down_b)
            out.index_add_(0, tok, (z * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def low_rank_owner(model: nn.Module, rank: int, owner: int, seed: int) -> None:
    """Replace every layer's experts module by a LowRankOwner (A drawn from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        layer.mlp.experts = LowRankOwner(layer.mlp.experts, rank, owner, g)


def is_low_rank(model: nn.Module) -> bool:
    return any(isinstance(layer.mlp.experts, LowRankOwner) for layer in model.model.layers)


@torch.no_grad()
def materialize(model: nn.Module) -> None:
    """Back to the stock experts modules, the owner's slices = anchor + B·A (float32 product)."""
    for layer in model.model.layers:
        lr = layer.mlp.experts
        if not isinstance(lr, LowRankOwner):
            continue
        stock, o = lr._stock[0], lr.owner
        for name, w, a, b in (
            ("gate_up_proj", lr.gate_up, lr.gate_up_a, lr.gate_up_b),
            ("down_proj", lr.down, lr.down_a, lr.down_b),
        ):
            w = w.clone()  # the buffer's device and dtype: where the model is now
            w[o] = (w[o].float() + b.detach().float() @ a.detach().float()).to(w.dtype)
            setattr(stock, name, nn.Parameter(w))
        layer.mlp.experts = stock
