"""Request-level preselection: the public expert plus the M allowed experts whose stored
statistics are closest to the text. A function of the allowed set only, so opt-out stays exact.

Scores: the cosine of the text's MiniLM embedding with each owner's closest MiniLM prototype
(k-means centres of its documents' embeddings; older packages: the mean, domain embedding).
Measured on the results run (results/preselect/prototypes.txt): math held-out windows go to the
math expert 0.98 of the time with prototypes, 0.71 with the mean, while 32/64-token prompts stay
at 0.99/1.00 (math windows are where the right pick matters most: oracle.md). A model
merged with --preselect-hidden (every package storing a hidden centroid, model/hidden.py) adds,
when the caller gives the tokenizer, the centred cosine of the anchor's mid-layer hidden states
(the merged model routed to its public expert = the anchor), the two standardised over the
scored experts and summed, ties going to MiniLM's ranking. Measured (results/preselect/): top-1
on SmolLM2 1.00 / 1.00 / 0.97 on 32-token / 64-token held-out / hand-written prompts against
MiniLM's 0.99 / 1.00 / 0.78 (0.94 / 0.99 / 0.84 against 1.00 / 0.99 / 0.78 on the 5.5M scratch
anchor), but held-out BPB +0.5% [+0.2%, +0.9%] (math +3.2%) on the results run: opt-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.model.embedding import embed_texts
from flexmoe.model.hidden import centred_cosine, mean_hidden
from flexmoe.model.router import current_mask, routing
from flexmoe.selection import expert_names
from flexmoe.store.merged import PUBLIC, experts_of

PRESELECT_CONTEXT = 256  # tokens before a scored window that preselection reads (64 measured worse)


def preselect_hook(model, tokenizer, stream, m: int, context: int = PRESELECT_CONTEXT):
    """A before_batch hook for evaluate_bpb: each window keeps public + the m experts closest to
    the text of the `context` tokens BEFORE it (the scored window is never read)."""

    def choose(starts: list[int]):
        n = context
        texts = [
            tokenizer.decode(stream.window(max(x - n, 0), min(x, n)).tolist()) if x else ""
            for x in starts
        ]
        return routing(model, rows=preselect_mask(model, texts, m, tokenizer=tokenizer))

    return choose


def standardised(s: torch.Tensor) -> torch.Tensor:
    """Scores per text (row) as z-scores over the experts, so two kinds add on one scale."""
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp(min=1e-6)


def combined_scores(minilm: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(n, k) MiniLM and hidden-state scores standardised and summed; a tie (possible with two
    experts) goes to MiniLM's ranking."""
    z = standardised(minilm)
    return z + standardised(hidden) + 1e-3 * z


def minilm_scores(
    model, texts: Sequence[str], experts: Sequence[int], prototypes: bool | None = None
) -> torch.Tensor:
    """(n, len(experts)) cosine of each text's MiniLM embedding with each expert's closest
    stored prototype, or with its mean domain embedding (`prototypes=False`, or when any of
    the experts stores none: a max over 8 and a single cosine are not on one scale)."""
    table = experts_of(model)
    names = [table.names[i] for i in experts]
    q = torch.from_numpy(embed_texts([t or " " for t in texts])).float()
    if prototypes is not False and all(n in table.domain_prototypes for n in names):
        protos = torch.stack([table.domain_prototypes[n].float() for n in names])  # (k, P, 384)
        return torch.einsum("nd,kpd->nkp", q, protos).amax(-1)
    if prototypes:
        raise FlexmoeError(
            "not every expert stores MiniLM prototypes (`expert centroid` adds them)"
        )
    emb = torch.stack([table.domain_embeddings[n].float() for n in names])
    return q @ torch.nn.functional.normalize(emb, dim=-1).T


def hidden_scores(model, tokenizer, texts: Sequence[str], experts: Sequence[int]) -> torch.Tensor:
    """(n, len(experts)) centred cosine of each text's anchor hidden state (the merged model on
    its public expert alone) with the experts' stored hidden centroids."""
    table = experts_of(model)
    public_only = torch.zeros(len(table.names), dtype=torch.bool)
    public_only[0] = True
    with routing(model, mask=public_only):
        x = mean_hidden(model, tokenizer, texts)
    cent = torch.stack([table.hidden_centroids[table.names[i]].float() for i in experts])
    return centred_cosine(x, cent)


def default_preselect(model) -> int | None:
    """The merged model's stored preselection (flexmoe_merged.json), None for token routing."""
    return experts_of(model).preselect


def preselect_mask(
    model,
    texts: Sequence[str],
    m: int,
    allowed: torch.Tensor | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """(len(texts), E) bool: per text, the public expert plus the m ALLOWED experts whose domain
    embedding is most similar (cosine, all-MiniLM-L6-v2) to the text's embedding. Choosing among
    the allowed (not opted-out) experts only keeps opt-out exact: excluding an expert gives the
    same choice as never merging it. `allowed` defaults to the routers' active mask. Experts
    without a stored embedding cannot be scored and stay; an empty text keeps every expert."""

    if m < 1:
        raise FlexmoeError("--preselect must be ≥ 1")
    names = expert_names(model)
    if allowed is None:
        allowed = current_mask(model)
    emb = experts_of(model).domain_embeddings
    scored = [i for i, n in enumerate(names) if n in emb and bool(allowed[i])]
    if not scored and not emb:
        raise FlexmoeError("--preselect: no expert in this model stores a domain embedding")
    mask = torch.ones(len(texts), len(names), dtype=torch.bool)
    if m >= len(scored):
        return mask
    scores = minilm_scores(model, texts, scored)
    table = experts_of(model)
    # the hidden states are the public expert's (the anchor's): only while it is allowed
    anchor_ok = names[0] == PUBLIC and bool(allowed[0])
    wanted = table.preselect_hidden and tokenizer is not None and anchor_ok
    if wanted and all(names[i] in table.hidden_centroids for i in scored):
        scores = combined_scores(scores, hidden_scores(model, tokenizer, texts, scored))
    top = scores.topk(m, dim=-1).indices
    for b, t in enumerate(texts):
        if t.strip():
            mask[b, scored] = False
            mask[b, [scored[j] for j in top[b].tolist()]] = True
    return mask
