"""Bits per byte: the one metric every flexmoe evaluation reports.

BPB = (sum of next-token NLL in nats) / ln 2 / (UTF-8 bytes those tokens cover). Dividing by bytes
instead of tokens makes numbers comparable across tokenizers. Special tokens (EOS) cover 0 bytes
and are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexmoe.data.corpus import DOMAINS
from flexmoe.data.shards import INDEX, TokenStream
from flexmoe.errors import FlexmoeError
from flexmoe.inference.preselect import preselect_hook


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise ValueError("bits_per_byte needs a positive byte count")
    return nll_nats / math.log(2) / n_bytes


def eval_windows(stream: TokenStream, seq_len: int, max_tokens: int | None) -> list[int]:
    """Start offsets of non-overlapping (seq_len+1)-token windows. With a token budget, the windows
    are spread evenly over the whole stream (not its first documents), deterministically."""
    n = len(stream) - 1
    starts = list(range(0, max(n - seq_len, 0) + 1, seq_len))
    if max_tokens is not None and len(starts) > max(1, max_tokens // seq_len):
        keep = max(1, max_tokens // seq_len)
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, keep).round().astype(int)]
    return starts


@torch.no_grad()
def evaluate_bpb(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    stream: TokenStream,
    token_bytes: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    before_batch: Callable[[list[int]], AbstractContextManager | None] | None = None,
) -> dict:
    """Mean loss (nats/token) and BPB of `logits_fn` (ids (B,T) → logits (B,T,V)) on a stream.
    before_batch(window starts) may return a context the batch's forward runs in (e.g. a
    model.routing that chooses experts from the text that precedes each window). Logits may
    be on any device: targets follow them.

    "windows": [[nll_nats, bytes], ...], one pair per scored window (eval_windows order), the
    unit flexmoe.evaluation.intervals resamples; they sum (up to float rounding) to the totals
    the BPB is computed from."""
    tb = torch.as_tensor(token_bytes)
    starts = eval_windows(stream, seq_len, max_tokens)
    nll_sum, n_tok, n_bytes = 0.0, 0, 0
    windows: list[list[float]] = []
    for i in range(0, len(starts), batch_size):
        batch = np.stack([stream.window(s, seq_len + 1) for s in starts[i : i + batch_size]])
        ids = torch.from_numpy(batch)
        ctx = before_batch(starts[i : i + batch_size]) if before_batch is not None else None
        with ctx or nullcontext():
            logits = logits_fn(ids[:, :-1]).float()
        targets = ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        nbytes = tb.to(logits.device)[targets.flatten()]
        keep = nbytes > 0
        nll_sum += float(nll[keep].double().sum())
        n_tok += int(keep.sum())
        n_bytes += int(nbytes.sum())
        rows = len(batch)  # per window: the same targets, summed within the window
        w_nll = nll.double().masked_fill(~keep, 0.0).view(rows, -1).sum(1).tolist()
        w_bytes = nbytes.view(rows, -1).sum(1).tolist()
        windows += [[a, int(b)] for a, b in zip(w_nll, w_bytes, strict=True)]
    return {
        "loss": nll_sum / max(n_tok, 1),
        "bpb": bits_per_byte(nll_sum, n_bytes),
        "tokens": n_tok,
        "bytes": n_bytes,
        "windows": windows,
    }


def unigram_bpb(
    train: TokenStream,
    heldout: TokenStream,
    token_bytes: np.ndarray,
    max_tokens: int | None = None,
    seq_len: int = 256,
) -> float:
    """BPB of an add-one unigram model fit on `train`, on the same targets evaluate_bpb scores."""
    vocab = len(token_bytes)
    counts = np.zeros(vocab, dtype=np.float64)
    for a in train.arrays:
        counts += np.bincount(a, minlength=vocab)[:vocab]
    logp = np.log((counts + 1) / (counts.sum() + vocab))
    starts = eval_windows(heldout, seq_len, max_tokens)
    targets = np.concatenate([heldout.window(s, seq_len + 1)[1:] for s in starts])
    nbytes = token_bytes[targets]
    keep = nbytes > 0
    return bits_per_byte(float(-logp[targets[keep]].sum()), int(nbytes.sum()))


def domain_streams(root: Path, split: str) -> dict[str, TokenStream]:
    """All <root>/<domain>/<split> shard dirs, FlexMix domains first, then any others."""
    root = Path(root)
    found = sorted(p.parent.parent.name for p in root.glob(f"*/{split}/{INDEX}"))
    if not found:
        raise FlexmoeError(f"no token shards under {root}/<domain>/{split}/")
    order = [d for d in DOMAINS if d in found] + [d for d in found if d not in DOMAINS]
    return {d: TokenStream(root / d / split) for d in order}


@torch.no_grad()
def bpb_by_domain(
    model,
    token_bytes,
    streams: dict[str, TokenStream],
    seq_len: int,
    max_tokens: int,
    batch_size: int = 8,
    preselect: int | None = None,
    tokenizer=None,
) -> dict[str, float]:
    """preselect=M: each window keeps public + the M experts closest to the text before it."""

    model.eval()
    device = next(model.parameters()).device
    return {
        d: evaluate_bpb(
            lambda ids: model(ids.to(device)).logits,
            s,
            token_bytes,
            seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            before_batch=preselect_hook(model, tokenizer, s, preselect) if preselect else None,
        )["bpb"]
        for d, s in streams.items()
    }
