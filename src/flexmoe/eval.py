"""Evaluation: per-domain held-out bits per byte for every kind of model flexmoe makes."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from flexmoe.bpb import evaluate_bpb, unigram_bpb
from flexmoe.data.corpus import DOMAINS
from flexmoe.data.shards import INDEX, TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError


def load_for_eval(path: Path):
    """(model, tokenizer) for an anchor, a dense expert or a merged model."""
    from flexmoe.infer import load_model

    model = load_model(Path(path))
    return model, load_tokenizer(path)


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
    from flexmoe.infer import preselect_hook

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


def bpb_table(
    model_dir: Path,
    data: Path,
    split: str = "heldout",
    max_tokens: int = 131072,
    seq_len: int = 256,
    unigram: bool = True,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    allow_no_public: bool = False,
    preselect: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> tuple[list[dict], list[str]]:
    """Per-domain BPB rows (+ mean) and notes to show the user (active experts, router tuning).
    preselect: None = the merged model's stored default, 0 = token routing alone."""
    if max_tokens < 1:
        raise FlexmoeError("--max-tokens must be ≥ 1")
    from flexmoe.model import place

    model, tok = load_for_eval(model_dir)
    place(model, device, dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    if not 2 <= seq_len <= max_pos:
        raise FlexmoeError(f"--seq-len must be between 2 and the model's {max_pos} positions")
    notes = []
    mask = None
    from flexmoe.infer import is_merged

    if is_merged(model):
        from flexmoe.infer import (
            PRESELECT_CONTEXT,
            default_preselect,
            expert_mask,
            expert_names,
        )

        mask = expert_mask(model, include, exclude, allow_no_public)
        names = expert_names(model)
        notes.append(
            "active experts: " + ", ".join(n for n, a in zip(names, mask, strict=True) if a)
        )
        for n, reason in getattr(model, "flexmoe_withheld", {}).items():
            notes.append(f"expert '{n}' withheld: {reason}")
        preselect = default_preselect(model) if preselect is None else preselect
        if preselect:
            notes.append(
                f"preselection: public + {preselect} expert(s) per window, chosen from the "
                f"{PRESELECT_CONTEXT} tokens before it"
            )
        if getattr(model, "flexmoe_router_tuned", False):
            notes.append("note: router-tuned model (exact opt-out holds for the un-tuned model)")
    elif include or exclude or preselect:
        raise FlexmoeError(
            f"{model_dir} is a dense model: --include/--exclude/--preselect need a merged model"
        )
    tb = token_byte_lengths(tok)
    streams = domain_streams(data, split)
    from flexmoe.model import routing

    with routing(model, mask=mask) if mask is not None else nullcontext():
        scores = bpb_by_domain(
            model, tb, streams, seq_len, max_tokens, preselect=preselect, tokenizer=tok
        )
    rows = []
    for d, s in streams.items():
        row = {"domain": d, "bpb": scores[d]}
        train_dir = Path(data) / d / "train"
        if unigram and (train_dir / INDEX).is_file():
            row["unigram bpb"] = unigram_bpb(TokenStream(train_dir), s, tb, max_tokens, seq_len)
        rows.append(row)
    mean = {"domain": "mean", "bpb": sum(scores.values()) / len(scores)}
    if unigram and all("unigram bpb" in r for r in rows):
        mean["unigram bpb"] = sum(r["unigram bpb"] for r in rows) / len(rows)
    return rows + [mean], notes
