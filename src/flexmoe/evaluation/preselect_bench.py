"""How often request-level preselection picks the right expert: a labelled benchmark.

Prompts are the first 32 and 64 tokens of each domain's held-out documents plus the short
hand-written prompts of data/preselect-prompts.json; the right answer is the domain's own expert.
Each method ranks the merged model's owner experts (the public expert is always kept) and top-1
accuracy is counted per domain:

- `minilm`: the default: cosine of the prompt's all-MiniLM-L6-v2 embedding with each owner's
  closest stored prototype (k-means centres of its documents' embeddings; the mean document
  embedding for packages without prototypes, inference.preselect); left out when a package
  stores no embedding.
- `minilm-mean`: the same with each owner's mean document embedding (what packages stored
  before prototypes), shown when every package stores prototypes.
- `hidden`: cosine of the anchor's mean hidden state over the prompt (middle layer) with each
  owner's mean over its TRAINING documents, the statistic a package would store (both centred
  on the owners' mean, model/hidden.py).
- `router`: the merged model's own routers over the prompt: softmax router probability of each
  owner expert, averaged over layers and tokens.
- `minilm+hidden`: both cosines, each standardised over the owners for the prompt, summed
  (inference.preselect.combined_scores, what `merge --preselect-hidden` serves): the
  MiniLM centroids know the owners' distribution, the anchor's hidden states generalise to short
  prompts unlike any document (a code signature).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from flexmoe.data.corpus import DEFAULT_ROOT, iter_docs
from flexmoe.evaluation.intervals import wilson
from flexmoe.inference.preselect import combined_scores, minilm_scores, preselect_mask
from flexmoe.model.hidden import (
    centred_cosine,
    centroid,
    hidden_layer,
    mean_hidden,
    token_batches,
)
from flexmoe.model.router import capture_router_logits
from flexmoe.selection import expert_names
from flexmoe.store.merged import experts_of

PROMPTS = Path(__file__).resolve().parents[3] / "data" / "preselect-prompts.json"
LENGTHS = (32, 64)
METHODS = ("minilm", "minilm-mean", "hidden", "router", "minilm+hidden")


def heldout_prompts(
    tokenizer, domains: Sequence[str], n: int, root: Path = DEFAULT_ROOT
) -> dict[str, list[tuple[str, str]]]:
    """{"32 tokens" | "64 tokens" | "hand-written": [(domain, text)]}: the first L tokens of the
    first n held-out documents of each domain that are longer than L tokens."""
    out: dict[str, list[tuple[str, str]]] = {f"{L} tokens": [] for L in LENGTHS}
    hand = json.loads(PROMPTS.read_text())
    out["hand-written"] = [(d, t) for d in domains for t in hand.get(d, [])]
    for d in domains:
        taken = 0
        for doc in iter_docs(root, d, "heldout"):
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            if len(ids) <= max(LENGTHS):
                continue
            for L in LENGTHS:
                out[f"{L} tokens"].append((d, tokenizer.decode(ids[:L])))
            taken += 1
            if taken == n:
                break
    return out


def hidden_centroids(
    anchor, tokenizer, domains: Sequence[str], docs: int, root: Path = DEFAULT_ROOT
) -> torch.Tensor:
    """(len(domains), hidden): each owner's centroid (model/hidden.py) over its first `docs`
    training documents, what a package stores as `hidden_centroid`."""
    rows = []
    for d in domains:
        texts = [doc["text"] for doc in islice(iter_docs(root, d, "train"), docs)]
        rows.append(centroid(anchor, tokenizer, texts))
    return torch.stack(rows)


@torch.no_grad()
def _router_scores(merged, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(n, experts): softmax router probability averaged over layers and the text's tokens."""
    out = []
    for ids, mask in token_batches(tokenizer, texts):
        with (
            capture_router_logits(merged) as logits,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            merged(ids, attention_mask=mask)
        p = torch.stack([torch.softmax(x[0], -1) for x in logits]).mean(0)  # (b·t, E)
        p = p.view(*ids.shape, -1)
        m = mask.unsqueeze(-1).float()
        out.append((p * m).sum(1) / m.sum(1))
    return torch.cat(out)


def run_bench(
    merged,
    anchor,
    tokenizer,
    domains: Sequence[str],
    n: int = 50,
    centroid_docs: int = 64,
    root: Path = DEFAULT_ROOT,
) -> dict:
    """→ {"layer", "sets": {set: {method: {domain: [hits, total]}}}, "confusion": {set: {method:
    {domain: {picked domain: count}}}}}."""
    names = expert_names(merged)
    owners = [d for d in domains if d in names]
    idx = [names.index(d) for d in owners]
    cent = hidden_centroids(anchor, tokenizer, owners, centroid_docs, root)
    layer = hidden_layer(anchor.config)
    sets = heldout_prompts(tokenizer, owners, n, root)
    res: dict = {"layer": layer, "n": n, "centroid_docs": centroid_docs}
    res |= {"sets": {}, "confusion": {}}
    for name, items in sets.items():
        texts = [t for _, t in items]
        picks = {}
        if all(d in experts_of(merged).domain_embeddings for d in owners):
            mask = preselect_mask(merged, texts, 1)
            picks["minilm"] = [
                next((names[i] for i in idx if mask[b, i]), "?") for b in range(len(texts))
            ]
            if all(d in experts_of(merged).domain_prototypes for d in owners):
                by_mean = minilm_scores(merged, texts, idx, prototypes=False)
                picks["minilm-mean"] = [owners[j] for j in by_mean.argmax(-1).tolist()]
        h = centred_cosine(mean_hidden(anchor, tokenizer, texts), cent)
        picks["hidden"] = [owners[j] for j in h.argmax(-1).tolist()]
        scores = _router_scores(merged, tokenizer, texts)[:, idx]
        picks["router"] = [owners[j] for j in scores.argmax(-1).tolist()]
        if "minilm" in picks:
            both = combined_scores(minilm_scores(merged, texts, idx), h)
            picks["minilm+hidden"] = [owners[j] for j in both.argmax(-1).tolist()]
        if name == "hand-written":
            res["picks"] = {"texts": texts, **picks}
        res["sets"][name] = {}
        res["confusion"][name] = {}
        for m, p in picks.items():
            acc, conf = {}, {}
            for d in owners:
                got = [q for (dd, _), q in zip(items, p, strict=True) if dd == d]
                acc[d] = [sum(q == d for q in got), len(got)]
                conf[d] = {o: got.count(o) for o in owners if got.count(o)}
            res["sets"][name][m] = acc
            res["confusion"][name][m] = conf
    return res


def bench_md(res: dict) -> str:
    """Top-1 accuracy per domain with its Wilson interval, one table per prompt set."""
    md = [
        "# Preselection: top-1 accuracy",
        "",
        f"Held-out prompts: the first 32/64 tokens of {res['n']} held-out documents per domain; "
        "hand-written: data/preselect-prompts.json. `hidden` uses the anchor's layer "
        f"{res['layer']} and each owner's mean over {res['centroid_docs']} training documents. "
        "Cells: accuracy [95% Wilson interval] (hits/prompts).",
    ]
    for name, by_method in res["sets"].items():
        owners = list(next(iter(by_method.values())))
        md += [
            "",
            f"## {name}",
            "",
            "| method | " + " | ".join(owners) + " | all |",
            "|---|" + "---:|" * (len(owners) + 1),
        ]
        for m, acc in by_method.items():
            cells = []
            for k, n in [*acc.values(), np.sum(list(acc.values()), axis=0).tolist()]:
                lo, hi = wilson(k, n) if n else (0.0, 0.0)
                cells.append(f"{k / max(n, 1):.2f} [{lo:.2f}, {hi:.2f}] ({k}/{n})")
            md.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"
