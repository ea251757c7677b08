"""The router: a stock HF dense anchor's stock MoE sibling (flexmoe.model.arch's table: OLMo-2 →
FlexOlmo, Llama/Mistral → Mixtral, Qwen3 → Qwen3-MoE) plus what FlexOlmo-the-method adds.

flexmoe does not re-implement the transformer. It adds, as a small diff over the MoE class:
- a per-layer, per-expert router bias b ≤ 0 (the paper's negative bias; stock HF has none),
- expert masks (global or per batch row) that set excluded experts' logits to −∞ before the
  softmax, with top-k clipped to the active experts — the exact opt-out,
- optional recording of routing weights, for attribution, and of the expert ids each position
  was computed with (`RoutingTrace.routes`: vLLM's `routed_experts` layout).

Per-request routing (expert mask, per-row masks, recording) is owned by one context manager,
`with routing(model, mask=…, rows=…, record=…)`. Its state is thread-local, so two requests
using one model from two threads never see each other's masks, and it is restored on any exit.
The router's `active` buffer is only the model's standing default (experts withheld at load).

A row whose mask leaves fewer than top-k experts is padded with its own top expert at weight 0
(not HF's "no expert" sentinel, which only the eager experts implementation skips), so masks are
exact on every experts backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import family_of
from flexmoe.model.device import EXPERTS_IMPL


# ---------------------------------------------------------------- MoE
@dataclass
class _Route:
    mask: torch.Tensor | None  # (experts,) bool
    rows: torch.Tensor | None  # (batch, experts) bool
    records: list | None  # (top_index, top_value) per forward call


_local = threading.local()


def _routes() -> dict[int, _Route]:
    routes = getattr(_local, "routes", None)
    if routes is None:
        routes = _local.routes = {}
    return routes


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


@contextlib.contextmanager
def routing(
    model: nn.Module,
    mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    record: bool = False,
) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Route this thread's forwards of `model` with an expert mask (E,) and/or per-row masks
    (B, E), AND-ed with any enclosing routing (an inner block can never re-enable an expert).
    record=True yields, per layer, the (top_index, top_value) of every forward call."""
    rs = routers(model)
    routes = _routes()
    saved = {id(r): routes.get(id(r)) for r in rs}
    mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
    out = []
    try:
        for r in rs:
            outer = saved[id(r)]
            dev = r.weight.device
            rec = [] if record else (outer.records if outer else None)
            routes[id(r)] = _Route(
                _and(outer.mask if outer else None, None if mask is None else mask.to(dev)),
                _and(outer.rows if outer else None, None if rows is None else rows.to(dev)),
                rec,
            )
            out.append(rec)
        yield out
    finally:
        for r in rs:
            if saved[id(r)] is None:
                routes.pop(id(r), None)
            else:
                routes[id(r)] = saved[id(r)]


def current_mask(model: nn.Module) -> torch.Tensor:
    """(E,) bool: the experts this thread's forwards may use now (standing mask ∧ routing)."""
    r = routers(model)[0]
    route = _routes().get(id(r))
    mask = r.active.cpu()
    return mask if route is None or route.mask is None else mask & route.mask.cpu()


class FlexmoeRouter(nn.Module):
    """The MoE block's top-k router plus bias, masks and recording; a drop-in for the stock router
    of every row of flexmoe.model.arch (same weight, same (logits, weights, indices) outputs).
    Softmax spans the ACTIVE experts only; top-k weights are renormalised when the row's class
    does."""

    def __init__(self, config: PretrainedConfig, renormalize: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.norm_topk_prob = renormalize
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))
        # the model's standing mask (experts withheld at load); requests use routing()
        self.register_buffer("active", torch.ones(self.num_experts, dtype=torch.bool), False)
        self.use_bias = True
        # training only: unmasked logits computed from a DETACHED input, so a loss on them (gate
        # calibration, z-loss) reaches this router's weight and bias and nothing upstream
        self.captured: list[torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        bias = self.bias.clamp(max=0.0) if self.use_bias else None
        logits = F.linear(hidden_states, self.weight)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        if self.captured is not None:
            own = F.linear(hidden_states.detach().float(), self.weight.float())
            self.captured.append(own + bias.float() if bias is not None else own)
        route = _routes().get(id(self))
        mask = self.active.unsqueeze(0)
        if route is not None and route.mask is not None:
            mask = mask & route.mask.unsqueeze(0)
        if route is not None and route.rows is not None:
            rows = route.rows.shape[0]
            mask = mask & route.rows.repeat_interleave(hidden_states.shape[0] // rows, dim=0)
        mask = mask.expand_as(logits)
        if not bool(mask.all()):
            if not bool(mask.any(-1).all()):
                raise FlexmoeError("a routing mask leaves a row with no active expert")
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        k = min(self.top_k, int(mask.sum(-1).max()))
        top_value, top_index = torch.topk(probs, k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        chosen_active = mask.gather(1, top_index)
        if not bool(chosen_active.all()):  # a row with fewer active experts than k: pad it with
            # its own top (active) expert at weight 0, exact on every experts implementation
            top_index = torch.where(chosen_active, top_index, top_index[:, :1])
            top_value = top_value.masked_fill(~chosen_active, 0.0)
        top_value = top_value.to(logits.dtype)
        if route is not None and route.records is not None:
            route.records.append((top_index.detach(), top_value.detach().float()))
        return logits, top_value, top_index


class capture_router_logits:
    """`with capture_router_logits(model) as logits:` → after a forward, one (tokens, experts)
    tensor per layer (see FlexmoeRouter.captured)."""

    def __init__(self, model: nn.Module):
        self.rs = routers(model)

    def __enter__(self) -> list[list[torch.Tensor]]:
        for r in self.rs:
            r.captured = []
        return [r.captured for r in self.rs]

    def __exit__(self, *exc) -> bool:
        for r in self.rs:
            r.captured = None
        return False


def install_routers(model: PreTrainedModel) -> PreTrainedModel:
    """Swap the MoE class's stock routers for FlexmoeRouter in place, keeping their weights."""

    # the class's own rule: Mixtral always renormalises (no flag); FlexOlmo and Qwen3-MoE follow
    # their config's norm_topk_prob (a stock checkpoint may set it)
    renorm = bool(
        getattr(model.config, "norm_topk_prob", family_of(model.config.model_type).renormalize)
    )
    for layer in model.model.layers:
        old = layer.mlp.gate
        if isinstance(old, FlexmoeRouter):
            continue
        new = FlexmoeRouter(model.config, renorm).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        layer.mlp.gate = new
    model.set_experts_implementation(EXPERTS_IMPL)
    return model


def routers(model: nn.Module) -> list[FlexmoeRouter]:
    return [m for m in model.modules() if isinstance(m, FlexmoeRouter)]


def set_active_experts(model: nn.Module, active: list[bool] | torch.Tensor) -> None:
    """The model's standing mask, under every request's routing(): used at load to withhold
    experts whose consent has lapsed. Per-request choices use routing()."""
    active = torch.as_tensor(active, dtype=torch.bool)
    for r in routers(model):
        r.active.copy_(active.to(r.active.device))


@dataclass
class RoutingTrace:
    """What `routing(record=True)` recorded: per layer, the (top_index, top_value) of every
    forward call. Attribution anywhere (generate, serve, the report) is a share of these
    weights; this type is the one place they are summed."""

    records: list[list[tuple[torch.Tensor, torch.Tensor]]]
    num_experts: int

    def layer_weights(self, last: int | None = None) -> torch.Tensor:
        """(layers, experts) float64 routing weight summed over every recorded token, or over
        the `last` token rows only (the generated tokens); the sentinel "no expert" is dropped."""
        n, out = self.num_experts, []
        for recs in self.records:
            total = torch.zeros(n + 1, dtype=torch.float64)
            if last is None:
                for index, value in recs:
                    total.index_add_(0, index.reshape(-1).cpu(), value.reshape(-1).double().cpu())
            else:  # rows → tokens
                index = torch.cat([i for i, _ in recs])[-last:].cpu()
                value = torch.cat([v for _, v in recs])[-last:].cpu()
                total.index_add_(0, index.reshape(-1), value.reshape(-1).double())
            out.append(total[:n])
        return torch.stack(out)

    def shares(self, last: int | None = None) -> torch.Tensor:
        """(experts,) each expert's share of all layers' routing weight (sums to 1)."""
        total = self.layer_weights(last).sum(0)
        return total / total.sum()

    def step_weights(self, batch: int) -> torch.Tensor:
        """(batch, experts) float64: the weight each expert carried, summed over layers, at the
        last position of each row of the latest forward (the position that produced a token)."""
        per_layer = []
        for recs in self.records:
            index, value = recs[-1]
            index = index.view(batch, -1, index.shape[-1])
            value = value.view(batch, -1, value.shape[-1])
            w = torch.zeros(batch, self.num_experts, dtype=torch.float64, device=index.device)
            w.scatter_add_(1, index[:, -1], value[:, -1].double())
            per_layer.append(w)
        return torch.stack(per_layer).sum(0).cpu()

    def routes(
        self, top_k: int | None = None, batch: int = 1, calls: slice = slice(None)
    ) -> RoutedExperts:
        """The experts every recorded position was computed with, as `RoutedExperts` of shape
        (batch, positions, layers, top_k): the forward calls in `calls` laid end to end along
        the positions (prefill, then one position per decode step), each call's rows padded to
        `top_k` slots (default: the widest call). A slot the model gave zero weight (the router's
        padding where fewer than top-k experts were allowed, see FlexmoeRouter) holds NO_EXPERT,
        never the expert it duplicates: an id on the wire is one the output depended on."""
        picked = [recs[calls] for recs in self.records]
        width = top_k or max(i.shape[-1] for recs in picked for i, _ in recs)
        ids, weights = [], []
        for recs in picked:
            layer = [_padded(i, v, batch, width) for i, v in recs]
            ids.append(torch.cat([i for i, _ in layer], 1))
            weights.append(torch.cat([v for _, v in layer], 1))
        return RoutedExperts(torch.stack(ids, 2), torch.stack(weights, 2), self.num_experts)


NO_EXPERT = -1  # an id slot with no expert in it (zero routing weight, or no forward at all)


def _padded(index: torch.Tensor, value: torch.Tensor, batch: int, width: int):
    """One forward call's (rows, k) record as (batch, positions, width) ids and weights, on the
    CPU, with NO_EXPERT (weight 0) wherever the router applied no weight."""
    index = index.view(batch, -1, index.shape[-1]).cpu()
    value = value.view(batch, -1, value.shape[-1]).float().cpu()
    index = torch.where(value > 0, index, NO_EXPERT)
    value = torch.where(value > 0, value, 0.0)
    extra = width - index.shape[-1]
    if extra > 0:  # a mask that allows fewer than top-k experts everywhere: topk was clipped
        index = F.pad(index, (0, extra), value=NO_EXPERT)
        value = F.pad(value, (0, extra), value=0.0)
    return index, value


@dataclass
class RoutedExperts:
    """Per position, per MoE layer, the top-k expert ids the model computed with and their
    routing weights: vLLM's `routed_experts` layout ([positions, layers, top-k] per sequence),
    which routing-replay clients read. Ids are indices into the merged model's expert order
    (`expert_names`); slots are in the router's order (largest weight first) and NO_EXPERT slots
    (weight 0) come last. Attribution (`layer_weights`, `shares`, `step_weights`) sums these same
    weights, so the ids a client sees and the shares it is billed by are one record."""

    ids: torch.Tensor  # (batch, positions, layers, top_k) int64, NO_EXPERT where no weight
    weights: torch.Tensor  # same shape, float32, 0 at NO_EXPERT
    num_experts: int

    def _sum(self, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        n = self.num_experts
        total = torch.zeros(n + 1, dtype=torch.float64)
        total.index_add_(0, torch.where(index < 0, n, index).reshape(-1), value.reshape(-1))
        return total[:n]

    def layer_weights(self, positions: slice = slice(None)) -> torch.Tensor:
        """(layers, experts) float64: routing weight summed over the batch and `positions`."""
        ids, weights = self.ids[:, positions], self.weights[:, positions].double()
        return torch.stack(
            [self._sum(ids[:, :, layer], weights[:, :, layer]) for layer in range(ids.shape[2])]
        )

    def shares(self, positions: slice = slice(None)) -> torch.Tensor:
        """(experts,) each expert's share of all layers' routing weight at `positions`."""
        total = self.layer_weights(positions).sum(0)
        return total / total.sum()

    def step_weights(self) -> torch.Tensor:
        """(batch, experts) float64: the weight each expert carried, summed over layers, at each
        row's last position (the position that produced that row's next token)."""
        rows = []
        for row in range(self.ids.shape[0]):
            ids, weights = self.ids[row, -1], self.weights[row, -1].double()
            rows.append(torch.stack([self._sum(i, w) for i, w in zip(ids, weights, strict=True)]))
        return torch.stack(rows).sum(1)
