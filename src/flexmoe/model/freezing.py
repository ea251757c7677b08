"""Training one owner's expert against a frozen model: parametrizations that give the owner's rows
its own parameters (the frozen rows stay bit-identical) and keep the router bias negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.model.router import routers


class NegativeSoftplus(nn.Module):
    """Bias parametrization b = −softplus(β) on the given experts, 0 on the others.

    b < 0 always and db/dβ = −sigmoid(β) never vanishes, unlike the paper's min(b, 0), whose
    gradient is 0 once b ≥ 0 (so a bias pushed up by the owner's data stays dead at 0).
    """

    def __init__(self, trainable: torch.Tensor):
        super().__init__()
        self.register_buffer("trainable", trainable.to(torch.bool), persistent=False)

    def forward(self, beta: torch.Tensor) -> torch.Tensor:
        return torch.where(self.trainable, -F.softplus(beta), torch.zeros_like(beta))

    def right_inverse(self, b: torch.Tensor) -> torch.Tensor:
        neg = (-b).clamp(min=1e-6)
        return torch.where(self.trainable, torch.log(torch.expm1(neg)), torch.zeros_like(b))


class FrozenSlices(nn.Module):
    """Parametrization: a stacked (experts, …) tensor = its frozen experts (a buffer) with the
    trainable experts' rows put in place. The optimizer then holds gradients and Adam state for
    the trainable rows only, weight decay can never touch a frozen row, and the frozen rows stay
    bit-identical because nothing ever writes to the buffer."""

    def __init__(self, full: torch.Tensor, trainable: list[int]):
        super().__init__()
        self.register_buffer("frozen", full.detach().clone(), persistent=False)
        self.register_buffer("index", torch.tensor(trainable, device=full.device), False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.frozen.index_copy(0, self.index, rows)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full.index_select(0, self.index)


OWNER_TENSORS = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")


def owner_only(model: nn.Module, trainable: list[int]) -> None:
    """Give the trainable experts their own parameters inside every stacked expert tensor and
    router weight (FrozenSlices); undo with merge_owner_params."""
    from torch.nn.utils import parametrize

    for layer in model.model.layers:
        for path in OWNER_TENSORS:
            owner, name = path.split(".")
            mod = getattr(layer.mlp, owner)
            param = getattr(mod, name, None)
            if not isinstance(param, nn.Parameter):
                continue  # a low-rank owner (model/lowrank.py): its own parameters already
            parametrize.register_parametrization(mod, name, FrozenSlices(param, trainable))


def merge_owner_params(model: nn.Module) -> None:
    """Back to plain stacked tensors (the layout packages and checkpoints are read from)."""
    from torch.nn.utils import parametrize

    for layer in model.model.layers:
        for path in OWNER_TENSORS:
            owner, name = path.split(".")
            mod = getattr(layer.mlp, owner)
            if parametrize.is_parametrized(mod, name):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)


def parametrize_bias(model: nn.Module, trainable: list[int], init: float) -> None:
    """Set b = init < 0 on the `trainable` experts of every router, learned through β."""
    from torch.nn.utils import parametrize

    if init >= 0:
        raise FlexmoeError(f"the bias must start negative (got {init})")
    for r in routers(model):
        mask = torch.zeros(r.num_experts, dtype=torch.bool)
        mask[trainable] = True
        with torch.no_grad():
            r.bias.copy_(torch.where(mask, torch.full_like(r.bias, init), r.bias))
        parametrize.register_parametrization(r, "bias", NegativeSoftplus(mask))
