"""The anchor's own view of a text: its mean hidden state halfway up the model.

An owner stores the mean over its documents (`hidden_centroid`, a statistic of the owner's data
like the MiniLM domain embedding) and request-level preselection compares a prompt's mean with
it. Measured (scripts/preselect_bench.py, results/preselect/): on SmolLM2 it recognises short
prompts unlike any document (`def fibonacci(n):`) that the MiniLM centroids miss; combined with
them it is right on 100% of 32- and 64-token held-out prompts and 97% of hand-written ones, but
held-out BPB is 0.5% worse, so it is opt-in (`merge --preselect-hidden`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_TOKENS = 256  # tokens of a text (document or prompt) read
CENTROID_DOCS = 64  # owner documents in a centroid (the benchmark's setting)


def hidden_layer(config) -> int:
    """The hidden state after this many blocks is used: the middle of the model."""
    return config.num_hidden_layers // 2


def token_batches(tokenizer, texts: Sequence[str], size: int = 16):
    """(ids, mask) batches, right-padded (the first position is a text's first token), each text
    cut to MAX_TOKENS tokens."""
    for i in range(0, len(texts), size):
        enc = tokenizer(
            [t or " " for t in texts[i : i + size]],
            add_special_tokens=False,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        yield enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def mean_hidden(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(n, hidden) mean over tokens of the L2-normalised hidden state after hidden_layer blocks
    (bf16 autocast), the first token left out: a pretrained LM's first position carries a massive
    activation (an attention sink) that would weigh 8× more in a 32-token prompt than in a
    256-token document and decide every comparison. `model` is the anchor, or a merged model
    routed to its public expert only (the same function)."""
    layer = hidden_layer(model.config)
    out = []
    for ids, mask in token_batches(tokenizer, texts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        h = torch.nn.functional.normalize(h.float(), dim=-1)
        m = mask.unsqueeze(-1).float()
        m[:, 0] = 0.0 if ids.shape[1] > 1 else 1.0
        out.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


def centroid(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(hidden,) the owner's centroid: mean_hidden over its documents (norm ≤ 1)."""
    return mean_hidden(model, tokenizer, texts).mean(0)


def centred_cosine(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, k) cosine of each text with each centroid after removing what the centroids share
    (their mean): hidden states of a pretrained LM share a large common direction that otherwise
    decides every cosine."""
    mu = centroids.mean(0)
    c = torch.nn.functional.normalize(centroids - mu, dim=-1)
    return torch.nn.functional.normalize(x - mu, dim=-1) @ c.T
