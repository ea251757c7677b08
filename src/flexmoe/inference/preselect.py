"""Request-level preselection: the public expert plus the M allowed experts whose domain embedding
is closest to the text. A function of the allowed set only, so opt-out stays exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.model.embedding import embed_texts
from flexmoe.model.router import current_mask, routing
from flexmoe.selection import expert_names
from flexmoe.store.merged import experts_of

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
        return routing(model, rows=preselect_mask(model, texts, m))

    return choose


def default_preselect(model) -> int | None:
    """The merged model's stored preselection (flexmoe_merged.json), None for token routing."""
    return experts_of(model).preselect


def preselect_mask(
    model, texts: Sequence[str], m: int, allowed: torch.Tensor | None = None
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
    keys = torch.nn.functional.normalize(torch.stack([emb[names[i]] for i in scored]), dim=-1)
    q = torch.from_numpy(embed_texts([t or " " for t in texts]))
    top = (q @ keys.T).topk(m, dim=-1).indices
    for b, t in enumerate(texts):
        if t.strip():
            mask[b, scored] = False
            mask[b, [scored[j] for j in top[b].tolist()]] = True
    return mask
