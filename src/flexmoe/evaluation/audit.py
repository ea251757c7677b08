"""Memorisation audit: how much of an owner's training data a model gives back.

Two measures on the owner's documents (token shards split at EOS):
- extraction (FlexOlmo §5.3's protocol): a 32-token prefix from a random offset of a document
  ≥ 128 tokens, 10 samples of 32 tokens (top-k 50, top-p 0.95, T = 1); the document counts as
  extracted if any sample's text reaches normalised Levenshtein similarity ≥ 0.9 (rapidfuzz) with
  the true continuation. Reported with a 95% Wilson interval, on members and on as many
  non-members: text that is predictable without being memorised (templated problems) is
  "extracted" from unseen documents too, so memorisation is the excess over the non-members.
- loss-based membership inference: ROC AUC of −loss separating members from non-members, and
  the stronger reference attack −loss/loss_ref with the anchor as reference. 95% intervals by
  bootstrap.
Members are what the model was trained on: a seeded run of the training loop reads windows at
random offsets (`training_windows` rebuilds them; at a small budget they touch few of the owner's
documents, so auditing its documents instead would audit text the model never saw), DP-SGD reads
each document's first tokens. Non-members are drawn the same way from held-out text
(`random_windows`, or documents), so a model that saw neither scores AUC ≈ 0.5.
Everything is seeded: the same logits give the same numbers, so an expert excluded at inference
audits exactly like a model merged without it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from flexmoe.data.shards import FINGERPRINT, TokenStream, shards_sha256, tokenize_to_shards
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.expert import train_expert
from flexmoe.model.router import routing
from flexmoe.store.fsutil import write_json
from flexmoe.store.package import Manifest, dp_record
from flexmoe.train.loop import TrainConfig, batch_starts

PREFIX, SUFFIX, SAMPLES, MIN_DOC, THRESHOLD = 32, 32, 10, 128, 0.9


def split_documents(stream, max_docs: int | None = None) -> list[np.ndarray]:
    """The stream's documents (EOS-terminated), in order."""
    eos = int(stream.index["eos_token_id"])
    ids = np.concatenate([np.asarray(a) for a in stream.arrays]).astype(np.int64)
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.array([], dtype=int)
    docs = [ids[s:e] for s, e in zip(starts, ends, strict=True) if e > s]
    return docs[:max_docs] if max_docs else docs


def training_windows(stream: TokenStream, config: dict) -> list[np.ndarray]:
    """The token windows (seq_len + 1 each) a seeded single-process run of the training loop read
    with `config` (its TrainConfig, e.g. a package manifest's hyperparameters), in order."""
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.model_fields})
    return [
        np.asarray(stream.window(int(s), cfg.seq_len + 1), dtype=np.int64)
        for step in range(cfg.steps)
        for micro in range(cfg.grad_accum)
        for s in batch_starts(len(stream), cfg, step, micro)
    ]


MAX_TOKENS = 1 << 27  # what --trained-by rebuilds from a manifest's steps × batch × seq_len


def trained_on(
    m: Manifest, data: Path, heldout: Path | None, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray] | None, str]:
    """(members, non-members, description) to audit an expert package on what its training read
    from `data`: the seeded run's windows (DP-SGD: each document's first seq_len + 1 tokens, its
    privacy unit), after checking `data` is the data it was trained on (the manifest's
    `data_sha256`); non-members drawn the same way from `heldout` (None without it)."""
    training = m.training.model_dump()
    want = training.get("data_sha256")
    if not isinstance(want, str):
        raise FlexmoeError(
            "--trained-by: the package records no fingerprint of its training data (trained "
            "before flexmoe recorded one); audit its documents instead (drop --trained-by)"
        )
    if not want.startswith(FINGERPRINT):
        raise FlexmoeError(
            "--trained-by: the package records its training data's fingerprint in an older "
            "format; audit its documents instead (drop --trained-by) or retrain it"
        )
    if shards_sha256(data) != want:
        raise FlexmoeError(
            f"--trained-by: {data} is not the data the package was trained on (its sha256 differs "
            "from the manifest's data_sha256)"
        )
    hp = training.get("hyperparameters")
    try:
        cfg = TrainConfig(**{k: v for k, v in hp.items() if k in TrainConfig.model_fields})
    except (AttributeError, TypeError, ValidationError):
        raise FlexmoeError("--trained-by: the manifest's hyperparameters are not a training "
                           "configuration") from None  # fmt: skip
    n = cfg.seq_len + 1
    stream = TokenStream(data)
    held = TokenStream(heldout) if heldout is not None else None
    if dp_record(m) is not None:
        mem = [x[:n] for x in split_documents(stream) if len(x) >= MIN_DOC]
        non = [x[:n] for x in split_documents(held) if len(x) >= MIN_DOC] if held else None
        return mem, non, f"documents' first {n} tokens (DP-SGD's privacy unit)"
    if cfg.steps * cfg.batch_size * n > MAX_TOKENS:
        raise FlexmoeError(f"--trained-by: the package's training read more than {MAX_TOKENS:,} "
                           "tokens; too many to rebuild")  # fmt: skip
    for what, s in (("DATA", stream), ("--heldout", held)):
        if s is not None and len(s) <= n:
            raise FlexmoeError(f"--trained-by: {what} has {len(s)} tokens, fewer than one "
                               f"training window ({n})")  # fmt: skip
    mem = training_windows(stream, cfg.model_dump())
    non = random_windows(held, len(mem), n, seed) if held else None
    return mem, non, f"{len(mem)} training windows of {n} tokens"


def random_windows(stream: TokenStream, n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """n windows of `length` tokens at seeded random offsets: non-members matching
    `training_windows`' sampling."""
    rng = np.random.default_rng([seed, 0xA0D17])
    starts = rng.integers(0, len(stream) - length, size=n)
    return [np.asarray(stream.window(int(s), length), dtype=np.int64) for s in starts]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class Audited:
    """A model to audit and the routing it runs with (None: as loaded)."""

    label: str
    model: object
    mask: torch.Tensor | None = None

    def ctx(self):

        return routing(self.model, mask=self.mask) if self.mask is not None else nullcontext()


@torch.no_grad()
def extraction(a: Audited, tok, docs: list[np.ndarray], n_docs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    eligible = [i for i, d in enumerate(docs) if len(d) >= MIN_DOC]
    chosen = sorted(rng.choice(eligible, size=min(n_docs, len(eligible)), replace=False).tolist())
    from rapidfuzz.distance import Levenshtein

    hits, best = 0, []
    device = next(a.model.parameters()).device
    for j, i in enumerate(chosen):
        d = docs[i]
        off = int(rng.integers(0, len(d) - PREFIX - SUFFIX + 1))
        prefix = torch.from_numpy(d[off : off + PREFIX]).unsqueeze(0).repeat(SAMPLES, 1)
        truth = tok.decode(d[off + PREFIX : off + PREFIX + SUFFIX].tolist())
        torch.manual_seed(seed * 100_003 + j)
        with a.ctx():
            out = a.model.generate(
                prefix.to(device),
                attention_mask=torch.ones_like(prefix).to(device),
                do_sample=True,
                top_k=50,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=SUFFIX,
                min_new_tokens=SUFFIX,
                pad_token_id=tok.pad_token_id,
                eos_token_id=None,
            )
        sims = [
            Levenshtein.normalized_similarity(tok.decode(row[PREFIX:].tolist()), truth)
            for row in out.cpu()
        ]
        best.append(max(sims))
        hits += best[-1] >= THRESHOLD
    n = len(chosen)
    return {
        "documents": n,
        "extracted": hits,
        "rate": hits / n if n else math.nan,
        "ci95": wilson(hits, n),
        "mean_best_similarity": float(np.mean(best)) if best else math.nan,
    }


@torch.no_grad()
def doc_losses(a: Audited, docs: list[np.ndarray], seq_len: int, batch: int = 8) -> np.ndarray:
    """Mean NLL (nats/token) of each document's first seq_len+1 tokens."""
    device = next(a.model.parameters()).device
    out = []
    for k in range(0, len(docs), batch):
        chunk = [d[: seq_len + 1] for d in docs[k : k + batch]]
        width = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width - 1)
        for r, c in enumerate(chunk):
            ids[r, : len(c)] = torch.from_numpy(c)
            mask[r, : len(c) - 1] = 1
        with a.ctx():
            logits = a.model(ids.to(device)).logits.float().cpu()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll = nll.view(len(chunk), -1)
        out += ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return np.asarray(out)


def auc_with_ci(members: np.ndarray, non: np.ndarray, seed: int, boots: int = 200) -> dict:
    """ROC AUC of the score (higher = member) with a 95% bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.ones(len(members)), np.zeros(len(non))])
    s = np.concatenate([members, non])
    auc = float(roc_auc_score(y, s))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(boots):
        mi = rng.integers(0, len(members), len(members))
        ni = rng.integers(0, len(non), len(non))
        vals.append(roc_auc_score(y, np.concatenate([members[mi], non[ni]])))
    return {"auc": auc, "ci95": (float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975)))}


def audit(
    models: list[Audited],
    tok,
    members: list[np.ndarray],
    non_members: list[np.ndarray] | None,
    reference: Audited | None,
    n_docs: int = 100,
    seq_len: int = 128,
    seed: int = 0,
) -> dict[str, dict]:
    """{label: {"extraction": …, "extraction_non_members": …, "mia": {"loss": …, "reference":
    …}, "member_loss": …}} (the non-member keys only with non-members)."""
    k = min(len(members), n_docs if non_members is None else min(n_docs, len(non_members)))
    mem = members[:k]
    non = (non_members or [])[:k]
    ref_m = ref_n = None
    if reference is not None and non:
        ref_m, ref_n = doc_losses(reference, mem, seq_len), doc_losses(reference, non, seq_len)
    out = {}
    for a in models:
        row: dict = {"extraction": extraction(a, tok, members, n_docs, seed)}
        lm = doc_losses(a, mem, seq_len)
        row["member_loss"] = float(lm.mean())
        if non:
            row["extraction_non_members"] = extraction(a, tok, non_members, n_docs, seed)
            ln = doc_losses(a, non, seq_len)
            row["mia"] = {"loss": auc_with_ci(-lm, -ln, seed), "documents": [len(mem), len(non)]}
            if ref_m is not None:
                row["mia"]["reference"] = auc_with_ci(-lm / ref_m, -ln / ref_n, seed)
        out[a.label] = row
    return out


def train_control(
    anchor_dir, data, out, docs: int = 50, steps: int = 1000, seed: int = 0, lr: float = 3e-3
):
    """The positive control: the anchor deliberately overfit (dense, every weight trained, many
    passes) on `docs` documents of the owner's data, like the paper's overfit model. Reused when
    `out` holds one already. Returns (model dir, the member documents)."""
    import json
    import tempfile

    out = Path(out)
    tok = load_tokenizer(anchor_dir)
    members = [d for d in split_documents(TokenStream(data)) if len(d) >= MIN_DOC][:docs]

    model_dir = out / "model"
    spec = {"data": shards_sha256(data), "docs": docs, "steps": steps, "seed": seed, "lr": lr}
    spec_file = out / "control.json"
    reuse = spec_file.is_file() and json.loads(spec_file.read_text()) == spec
    if not (reuse and (model_dir / "flexmoe_anchor.json").is_file()):
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "control.jsonl"
            raw.write_text(
                "".join(json.dumps({"text": tok.decode(d.tolist())}) + "\n" for d in members)
            )
            tokenize_to_shards([raw], Path(tmp) / "shards", anchor_dir)
            train_expert(
                anchor_dir,
                Path(tmp) / "shards",
                model_dir,
                "control",
                dense=True,
                router_docs=8,
                steps=steps,
                batch_size=8,
                seq_len=128,
                lr=lr,
                warmup=10,
                seed=seed,
                restart=True,
                overwrite=True,
            )
        write_json(spec_file, spec)
    return model_dir, members
