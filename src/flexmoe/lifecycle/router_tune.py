"""Optional router tuning ("RT", FlexOlmo §3.3.3): tune only the router rows on proxy data.

1. Each owner, alone, picks a *proxy* set from the PUBLIC data (`select_proxies`): a logistic
   regression on MiniLM embeddings (owner documents vs public documents) scores every public
   document; the k most owner-like public documents are the proxies. Only their public ids leave
   the owner (`proxies.json`); no private text, embedding or statistic is written.
2. After merging, `router_tune` loads the merged model, sets top_k = number of experts, freezes
   everything except every router's `weight` and `bias`, and trains those with the shared loop on
   the union of all owners' proxies plus a public sample. The output is a merged-model directory
   marked `router_tuned` in `flexmoe_merged.json` (`load_merged` exposes
   `experts_of(model).router_tuned`).

Opt-out caveat: the exact opt-out guarantee (masking an expert = merging without it) holds for the
UN-TUNED merged model only. RT changes every router row, and with proxies chosen by each owner's
classifier, so in a tuned model the remaining experts' rows were fitted with the removed expert
present and its owner's proxies in the data. Masking still never reads the removed expert's
weights, but the result is no longer what a merge without that expert would give.
tests/test_router_tune.py measures the difference.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flexmoe.data.corpus import CLOSED_DOMAINS, DEFAULT_ROOT, iter_docs, split_path
from flexmoe.data.shards import (
    TokenStream,
    discover_inputs,
    iter_jsonl,
    iter_texts,
    tokenize_to_shards,
)
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.expert import project_bias
from flexmoe.model.dense import fingerprint
from flexmoe.model.device import to_storage
from flexmoe.model.embedding import embed_texts
from flexmoe.model.router import routers
from flexmoe.store.fsutil import guard_output, sha256_file, write_json
from flexmoe.store.merged import EXPERTS_DIR, load_merged, read_merged_meta, save_merged
from flexmoe.store.records import library_versions
from flexmoe.train.loop import make_train_config, train

PROXY_FORMAT = "flexmoe-proxies"


SELECTIONS = ("relevance", "diverse")
DIVERSE_POOL = 4  # "diverse" clusters the DIVERSE_POOL × k most owner-like public documents


def select_proxies(
    owner_texts: Sequence[str],
    public_docs: Sequence[tuple[str, str]],
    k: int,
    seed: int = 0,
    selection: str = "relevance",
) -> list[str]:
    """Ids of k public documents an owner-vs-public classifier finds owner-like.

    "relevance": the k highest-scored. "diverse" (after MetaMoE's relevance + diversity
    selection): the DIVERSE_POOL × k highest-scored are clustered into k groups (k-means on their
    MiniLM embeddings) and each group gives its highest-scored document, so near-duplicates of
    one topic do not fill the budget. Public scores are out-of-fold (2 folds): a document is
    never scored by a classifier that saw it labelled "public", which would push exactly the
    candidates we want down the ranking.
    """
    if selection not in SELECTIONS:
        raise FlexmoeError(f"--selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise FlexmoeError("proxy selection needs scikit-learn: pip install scikit-learn") from None
    owner_texts = [t for t in owner_texts if t]
    if not owner_texts:
        raise FlexmoeError("no owner documents to train the proxy classifier on")
    if len(public_docs) < 2:
        raise FlexmoeError("need at least 2 public documents to choose proxies from")
    if not 1 <= k <= len(public_docs):
        raise FlexmoeError(
            f"--k {k} must be between 1 and the public documents ({len(public_docs)})"
        )
    emb = embed_texts([*owner_texts, *(t for _, t in public_docs)])
    own, pub = emb[: len(owner_texts)], emb[len(owner_texts) :]
    fold = np.random.default_rng(seed).permutation(len(pub)) % 2
    scores = np.empty(len(pub), dtype=np.float64)
    for f in (0, 1):
        x = np.concatenate([own, pub[fold != f]])
        y = np.concatenate([np.ones(len(own)), np.zeros(int((fold != f).sum()))])
        clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, random_state=seed)
        clf.fit(x, y)
        scores[fold == f] = clf.decision_function(pub[fold == f])
    order = np.argsort(-scores, kind="stable")
    if selection == "relevance" or k == len(pub):
        return [public_docs[i][0] for i in order[:k].tolist()]
    from sklearn.cluster import KMeans

    pool = order[: min(len(pub), DIVERSE_POOL * k)]
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(pub[pool])
    best = {}  # cluster → its highest-scored member (pool is in score order)
    for i, c in zip(pool.tolist(), labels.tolist(), strict=True):
        best.setdefault(c, i)
    picked = sorted(best.values(), key=lambda i: (-scores[i], i))
    return [public_docs[i][0] for i in picked]


def read_public(path: Path) -> list[tuple[str, str]]:
    """(id, text) of a FlexMix-style jsonl(.gz/.xz) with `id` and `text` fields; ids unique."""

    path = Path(path)
    if not path.is_file():
        raise FlexmoeError(f"public data not found: {path}")
    docs: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        for lineno, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise FlexmoeError(f"{path}:{lineno}: needs a string field 'text'")
            if not isinstance(rec.get("id"), str | int) or isinstance(rec["id"], bool):
                raise FlexmoeError(f"{path}:{lineno}: needs a string or integer field 'id'")
            doc_id = str(rec["id"])
            if doc_id in seen:
                raise FlexmoeError(f"{path}:{lineno}: duplicate id '{doc_id}'")
            seen.add(doc_id)
            docs.append((doc_id, rec["text"]))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise FlexmoeError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not docs:
        raise FlexmoeError(f"{path}: no documents")
    return docs


def read_owner_texts(
    data: str, corpus: Path | None = None, max_docs: int = 1000, seed: int = 0
) -> tuple[str, list[str]]:
    """(owner label, texts): `data` is a jsonl/txt/parquet path or directory, or a FlexMix-mini
    domain name (its train split). At most max_docs documents, chosen by seed."""

    p = Path(data)
    if p.exists():
        texts = [t for kind, f in discover_inputs([p]) for t in iter_texts(kind, f, "text") if t]
        label = p.name.split(".")[0] or "owner"
    elif data in CLOSED_DOMAINS:
        root = Path(corpus) if corpus is not None else DEFAULT_ROOT
        if not split_path(root, data, "train").is_file():
            raise FlexmoeError(f"no train split for domain '{data}' under {root}")
        texts = [d["text"] for d in iter_docs(root, data, "train") if d.get("text")]
        label = data
    else:
        raise FlexmoeError(
            f"--data '{data}' is neither a file/directory nor a domain "
            f"({', '.join(CLOSED_DOMAINS)})"
        )
    if not texts:
        raise FlexmoeError(f"--data '{data}': no documents")
    if len(texts) > max_docs:
        pick = np.random.default_rng(seed).permutation(len(texts))[:max_docs]
        texts = [texts[i] for i in sorted(pick.tolist())]
    return label, texts


def write_proxies(
    out: Path, owner: str, public_path: Path, ids: Sequence[str], selection: str = "relevance"
) -> dict:
    """proxies.json: public ids and the public file's hash only — never owner text."""
    rec = {
        "format": PROXY_FORMAT,
        "owner": owner,
        "public_source_sha256": sha256_file(public_path),
        "selection": selection,
        "ids": list(ids),
    }
    write_json(out, rec)
    return rec


def load_proxies(path: Path) -> dict:
    """Read and check a proxies.json (untrusted input: plain JSON with ids only)."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlexmoeError(f"proxies file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexmoeError(f"{path}: not valid JSON ({e})") from None
    ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("ids"), list)
        and all(isinstance(i, str) for i in rec["ids"])
        and isinstance(rec.get("public_source_sha256"), str)
        and isinstance(rec.get("owner", ""), str)
    )
    if not ok:
        raise FlexmoeError(f"{path}: not a proxies file (need 'ids': [str], public_source_sha256)")
    return rec


# ---------------------------------------------------------------- merger side: tuning
def router_tune_config(**overrides):
    """Defaults at demo scale (AI2: lr 2e-3, warmup 100, 5B tokens). Weight decay 0."""

    base = dict(steps=100, batch_size=16, seq_len=256, lr=2e-3, warmup=10, weight_decay=0.0)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return make_train_config(**base)


def freeze_for_router_tuning(model) -> list[str]:
    """requires_grad on every router's weight and bias only; returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        trainable = name.endswith((".mlp.gate.weight", ".mlp.gate.bias"))
        p.requires_grad_(trainable)
        if trainable:
            names.append(name)
    if not names:
        raise FlexmoeError("model has no router parameters to tune")
    return names


def set_top_k(model, k: int) -> None:
    """Config and every router: the HF router reads top_k once, at construction."""

    model.config.num_experts_per_tok = k
    for r in routers(model):
        r.top_k = k


def router_tune(
    model_dir: Path,
    proxies: Sequence[Path],
    public: Path,
    out: Path,
    tokenizer_from: Path | None = None,
    public_docs: int = 1000,
    resume: bool = False,
    overwrite: bool = False,
    restart: bool = False,
    **overrides,
) -> dict:
    """Tune the routers of a merged model on proxies ∪ a public sample; write a merged dir."""

    guard_output(out, "merged model", [model_dir, *proxies, public, tokenizer_from], overwrite)

    model_dir, out = Path(model_dir), Path(out)
    meta = read_merged_meta(model_dir)
    if meta is None:
        raise FlexmoeError(f"{model_dir}: not a flexmoe merged model (no flexmoe_merged.json)")
    if not proxies:
        raise FlexmoeError("give at least one proxies file (--proxies)")
    if public_docs < 0:
        raise FlexmoeError("--public-docs must be ≥ 0")
    cfg = router_tune_config(**overrides)
    public_sha = sha256_file(public) if Path(public).is_file() else None
    docs = dict(read_public(public))
    proxy_ids: list[str] = []
    proxy_records = []
    for p in proxies:
        rec = load_proxies(p)
        if rec["public_source_sha256"] != public_sha:
            raise FlexmoeError(
                f"{p}: proxies were chosen from a different public file than {public}"
            )
        missing = [i for i in rec["ids"] if i not in docs]
        if missing:
            raise FlexmoeError(f"{p}: {len(missing)} id(s) not in {public} (e.g. '{missing[0]}')")
        proxy_ids += rec["ids"]
        proxy_records.append(
            {"owner": rec.get("owner"), "sha256": sha256_file(p), "ids": len(rec["ids"])}
        )
    chosen = list(dict.fromkeys(proxy_ids))  # union, first-seen order
    taken = set(chosen)
    rest = [i for i in docs if i not in taken]
    sample = np.random.default_rng(cfg.seed).permutation(len(rest))[:public_docs]
    sample_ids = [rest[i] for i in sorted(sample.tolist())]

    tok_dir = Path(tokenizer_from) if tokenizer_from is not None else model_dir
    tok = load_tokenizer(tok_dir)
    model = load_merged(model_dir)
    if len(tok) > model.config.vocab_size:
        raise FlexmoeError(f"tokenizer at {tok_dir} has more tokens than the model's vocabulary")
    n_experts = model.config.num_experts
    top_k_before = model.config.num_experts_per_tok
    base_fp = fingerprint(model.state_dict())
    set_top_k(model, n_experts)
    freeze_for_router_tuning(model)

    work = out.with_name(out.name + ".train")
    with tempfile.TemporaryDirectory(prefix="flexmoe-rt-") as tmp:
        raw = Path(tmp) / "rt.jsonl"
        with open(raw, "w", encoding="utf-8") as f:
            for i in chosen + sample_ids:
                f.write(json.dumps({"text": docs[i]}) + "\n")
        stats = tokenize_to_shards([raw], Path(tmp) / "shards", tok_dir)
        stream = TokenStream(Path(tmp) / "shards")
        result = train(
            model,
            stream,
            cfg,
            work,
            post_step=project_bias,
            resume=resume,
            restart=restart,
            progress_label="router tuning",
        )
    if result.get("stopped"):
        return result

    to_storage(model)
    model.eval()
    model.requires_grad_(False)
    ids_hash = hashlib.sha256("\n".join(chosen).encode()).hexdigest()
    tuned = {
        "base_model_fingerprint": base_fp,
        "proxies": proxy_records,
        "proxy_ids_sha256": ids_hash,
        "proxy_documents": len(chosen),
        "public_source_sha256": public_sha,
        "public_documents": len(sample_ids),
        "train_tokens_available": stats.tokens,
        "tokens": result["tokens"],
        "steps": result["step"],
        "lr": cfg.lr,
        "warmup": cfg.warmup,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "final_loss": result["loss"],
        "top_k_before": top_k_before,
        "trained": "router weight and bias only",
    }
    new_meta = {**meta, "top_k": n_experts, "router_tuned": tuned, "libraries": library_versions()}
    packages = [
        (n, model_dir / EXPERTS_DIR / n)
        for n in meta.get("experts", [])
        if (model_dir / EXPERTS_DIR / n).is_dir()
    ]
    save_merged(out, model, tok, new_meta, packages)
    return tuned
