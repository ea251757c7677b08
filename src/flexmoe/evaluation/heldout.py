"""Evaluation: per-domain held-out bits per byte for every kind of model flexmoe makes."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from flexmoe.data.shards import INDEX, TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import bpb_by_domain, domain_streams, unigram_bpb
from flexmoe.inference.preselect import PRESELECT_CONTEXT, default_preselect
from flexmoe.model.device import place
from flexmoe.model.router import routing
from flexmoe.selection import expert_mask, expert_names
from flexmoe.store.merged import experts_of, is_merged, load_model


def load_for_eval(path: Path):
    """(model, tokenizer) for an anchor, a dense expert or a merged model."""

    model = load_model(Path(path))
    return model, load_tokenizer(path)


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
    device: str = "auto",
    dtype: str | None = None,
) -> tuple[list[dict], list[str]]:
    """Per-domain BPB rows (+ mean) and notes to show the user (active experts, router tuning).
    preselect: None = the merged model's stored default, 0 = token routing alone."""
    if max_tokens < 1:
        raise FlexmoeError("--max-tokens must be ≥ 1")

    model, tok = load_for_eval(model_dir)
    place(model, device, dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    if not 2 <= seq_len <= max_pos:
        raise FlexmoeError(f"--seq-len must be between 2 and the model's {max_pos} positions")
    notes = []
    mask = None

    if is_merged(model):
        mask = expert_mask(model, include, exclude, allow_no_public)
        names = expert_names(model)
        notes.append(
            "active experts: " + ", ".join(n for n, a in zip(names, mask, strict=True) if a)
        )
        for n, reason in experts_of(model).withheld.items():
            notes.append(f"expert '{n}' withheld: {reason}")
        preselect = default_preselect(model) if preselect is None else preselect
        if preselect:
            notes.append(
                f"preselection: public + {preselect} expert(s) per window, chosen from the "
                f"{PRESELECT_CONTEXT} tokens before it"
            )
        if experts_of(model).router_tuned:
            notes.append("note: router-tuned model (exact opt-out holds for the un-tuned model)")
    elif include or exclude or preselect:
        raise FlexmoeError(
            f"{model_dir} is a dense model: --include/--exclude/--preselect need a merged model"
        )
    tb = token_byte_lengths(tok)
    streams = domain_streams(data, split)

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
