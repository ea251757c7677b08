"""Inference on a merged model: load, choose experts per request, generate, attribute.

Choosing experts never reloads or changes weights: it flips the routers' `active` masks (or sets
per-row masks), which put −∞ on excluded experts' logits before the softmax. That is the exact
opt-out — the same function as a model merged without those experts.

Attribution and the routed experts (vLLM's `routed_experts` wire layout) come from one record:
the `RoutedExperts` of the generation's forwards, so the ids a client sees and the shares an
owner is credited by cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.inference.preselect import default_preselect, preselect_mask
from flexmoe.model.router import NO_EXPERT, RoutedExperts, RoutingTrace, routers, routing
from flexmoe.selection import consent_exclusions, expert_mask, expert_names
from flexmoe.store.merged import is_merged


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    active: list[str]
    attribution: dict[str, float] | None = None
    per_layer: list[dict[str, float]] | None = None
    excluded: list[tuple[str, str]] = field(default_factory=list)
    # vLLM's layout: [prompt tokens | generated tokens][MoE layers][top-k] expert ids, -1 = none
    prompt_routed_experts: list[list[list[int]]] | None = None
    routed_experts: list[list[list[int]]] | None = None
    expert_names: list[str] | None = None  # id → name, the merged model's expert order


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    attribution: bool = False,
    per_layer: bool = False,
    seed: int | None = None,
    allow_no_public: bool = False,
    use: str | None = None,
    preselect: int | None = None,
    routed_experts: bool = False,
) -> Generation:
    """Generate with the KV cache (greedy at temperature 0). Attribution is each expert's share
    of the routing weight at the positions that produced the GENERATED tokens (not the prompt).
    `preselect=M` keeps, besides the public expert, only the M experts whose domain embedding is
    closest to the prompt's; None uses the merged model's stored default, 0 turns it off. The
    expert choice (include/exclude, consent, preselection) holds for this call only: the model's
    previous mask is restored afterwards. `routed_experts` returns, per prompt and per generated
    token, the expert ids each MoE layer computed with (see `split_routes`)."""
    if max_new_tokens < 1:
        raise FlexmoeError("--max-new-tokens must be ≥ 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise FlexmoeError("need temperature ≥ 0 and 0 < top-p ≤ 1")
    if not is_merged(model):
        given = [
            flag
            for flag, v in (
                ("--include", include),
                ("--exclude", exclude),
                ("--attribution", attribution),
                ("--per-layer", per_layer),
                ("--use", use),
                ("--preselect", preselect),
                ("--routed-experts", routed_experts),
            )
            if v
        ]
        if given:
            raise FlexmoeError(f"{', '.join(given)}: a dense model has no experts to choose")
    names = expert_names(model) if is_merged(model) else ["dense"]
    excluded = consent_exclusions(model, use)
    exclude = sorted(set(exclude or []) | {n for n, _ in excluded})
    mask = expert_mask(model, include, exclude, allow_no_public) if is_merged(model) else None
    preselect = default_preselect(model) if preselect is None else preselect
    if preselect:  # request-level: a function of the active set, so opt-out stays exact
        mask = mask & preselect_mask(model, [prompt], preselect, mask, tokenizer)[0]
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    record = bool(attribution or per_layer or routed_experts) and mask is not None
    ctx = routing(model, mask=mask, record=record) if mask is not None else None
    with ctx or nullcontext([]) as records:
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        device = next(model.parameters()).device
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ).cpu()
    new = out[0, ids.shape[1] :].tolist()
    result = Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        token_ids=new,
        prompt_ids=ids[0].tolist(),
        active=names if mask is None else [n for n, a in zip(names, mask, strict=True) if a],
        excluded=excluded,
    )
    if record and new:
        routes = RoutingTrace(records, len(names)).routes(routers(model)[0].top_k)
        made = slice(ids.shape[1] - 1, ids.shape[1] - 1 + len(new))  # positions that made `new`
        if attribution:
            shares = routes.shares(made)
            result.attribution = dict(zip(names, shares.tolist(), strict=True))
        if per_layer:
            result.per_layer = [
                dict(zip(names, (t / t.sum()).tolist(), strict=True))
                for t in routes.layer_weights(made)
            ]
        if routed_experts:
            prompt, generated = split_routes(routes, ids.shape[1], len(new))
            result.prompt_routed_experts, result.routed_experts = prompt, generated
            result.expert_names = list(names)
    return result


def split_routes(
    routes: RoutedExperts, n_prompt: int, n_new: int
) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
    """(prompt_routed_experts, routed_experts) of one sequence in vLLM's layout: row t holds the
    experts position t was computed with, the token AT t as input (what a routing-replay trainer
    re-runs over prompt + completion). The last generated token was never fed to the model (no
    forward needed it), so its row is all NO_EXPERT: every row is exactly what was computed, and
    a request returns the same rows alone or batched."""
    ids = routes.ids[0]
    prompt, generated = ids[:n_prompt], ids[n_prompt : n_prompt + n_new]
    missing = n_new - generated.shape[0]
    if missing > 0:
        pad = torch.full((missing, *ids.shape[1:]), NO_EXPERT, dtype=ids.dtype)
        generated = torch.cat([generated, pad])
    return prompt.tolist(), generated.tolist()
