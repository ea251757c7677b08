"""Checks on the committed FlexMix-mini corpus: schema, sizes, leakage and domain separation."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import Counter

import numpy as np
import pytest
from flexmix.build import (  # tools/flexmix: the corpus build tool (pytest pythonpath)
    NEAR_DUP_JACCARD,
    ShingleHasher,
    find_near_duplicates,
    jaccard,
    normalize_text,
)

from flexmoe.data.corpus import DEFAULT_ROOT, DOMAINS, SPLITS, iter_docs, split_path

ROOT = DEFAULT_ROOT


@pytest.fixture(scope="module")
def corpus() -> dict[tuple[str, str], list[dict]]:
    if not (ROOT / "manifest.json").exists():
        pytest.fail(f"FlexMix-mini not found at {ROOT}")
    return {(d, s): list(iter_docs(ROOT, d, s)) for d in DOMAINS for s in SPLITS}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((ROOT / "manifest.json").read_text("utf-8"))


def test_schema_ids_and_sizes(corpus, manifest) -> None:
    ids: set[str] = set()
    for (dom, sp), docs in corpus.items():
        assert docs, f"{dom}/{sp} is empty"
        nbytes = 0
        for doc in docs:
            assert set(doc) == {"id", "source", "domain", "text"}
            assert doc["domain"] == dom
            assert isinstance(doc["text"], str) and len(doc["text"]) >= 200
            assert len(doc["text"]) <= 20_000
            assert doc["id"] not in ids, f"duplicate id {doc['id']}"
            ids.add(doc["id"])
            nbytes += len(doc["text"].encode("utf-8"))
        entry = manifest["domains"][dom][sp]
        assert entry["documents"] == len(docs)
        assert entry["bytes"] == nbytes
        if sp == "train":
            assert nbytes >= (15_000_000 if dom == "public" else 3_000_000), (dom, nbytes)
        else:
            assert nbytes >= 150_000, (dom, nbytes)
    for dom in DOMAINS:
        tr = manifest["domains"][dom]["train"]["bytes"]
        ho = manifest["domains"][dom]["heldout"]["bytes"]
        assert 0.02 <= ho / (tr + ho) <= 0.15, (dom, ho / (tr + ho))


def test_manifest_hashes_and_size_budget(manifest) -> None:
    total = 0
    for dom in DOMAINS:
        for sp in SPLITS:
            data = split_path(ROOT, dom, sp).read_bytes()
            assert hashlib.sha256(data).hexdigest() == manifest["domains"][dom][sp]["sha256"]
            total += len(data)
    assert total < 30_000_000
    for src in manifest["sources"]:
        assert src["version"] and src["licence"]
    assert (ROOT / "DATA_CARD.md").read_text("utf-8").count(manifest["build_command"]) >= 1


def test_no_heldout_leakage(corpus) -> None:
    held = [d for (_, sp), docs in corpus.items() if sp == "heldout" for d in docs]
    train = [d for (_, sp), docs in corpus.items() if sp == "train" for d in docs]
    held_ids = {d["id"] for d in held}
    held_text = {hashlib.sha1(normalize_text(d["text"]).encode()).digest() for d in held}
    for d in train:
        assert d["id"] not in held_ids
        assert hashlib.sha1(normalize_text(d["text"]).encode()).digest() not in held_text, d["id"]
    hasher = ShingleHasher()
    pairs = find_near_duplicates(
        [hasher(d["text"]) for d in train], [hasher(d["text"]) for d in held]
    )
    assert not pairs, [(train[q]["id"], held[r]["id"], j) for q, r, j in pairs[:5]]


def test_sources_belong_to_one_domain(corpus, manifest) -> None:
    owner: dict[str, str] = {}
    for (dom, _), docs in corpus.items():
        for d in docs:
            assert owner.setdefault(d["source"], dom) == dom, d["source"]
    declared = {s["name"]: s["domain"] for s in manifest["sources"]}
    for src, dom in owner.items():
        assert declared.get(src) == dom, src


def _bow(text: str, cache: dict[str, int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    counts = Counter(text.lower().split())
    idx = []
    for w in counts:
        h = cache.get(w)
        if h is None:
            h = cache[w] = zlib.crc32(w.encode()) % dim
        idx.append(h)
    return np.array(idx, dtype=np.int64), np.log1p(np.array(list(counts.values()), float))


def test_domains_are_distinct(corpus) -> None:
    """Nearest-prototype tf-idf bag of words: held-out docs land in their own domain.

    One centroid per source (labelled with its domain), built from train splits only, so a
    domain whose text resembled another domain's would lose its held-out docs to it.
    """
    dim, cache = 1 << 18, {}
    budget = 1_000_000  # characters of train text per source, enough for stable centroids
    by_source: dict[str, list] = {}
    for dom in DOMAINS:
        for d in corpus[dom, "train"]:
            by_source.setdefault(d["source"], []).append(d)
    labels, vecs = [], []
    df = np.zeros(dim)
    for src in sorted(by_source):
        docs = by_source[src]
        step = max(1, int(sum(len(d["text"]) for d in docs) / budget))
        vs = [_bow(d["text"], cache, dim) for d in docs[::step]]
        for idx, _ in vs:
            df[idx] += 1
        labels.append(docs[0]["domain"])
        vecs.append(vs)
    idf = np.log((1 + sum(len(v) for v in vecs)) / (1 + df)) + 1
    cents = np.zeros((len(labels), dim))
    for i, vs in enumerate(vecs):
        for idx, val in vs:
            w = val * idf[idx]
            cents[i, idx] += w / np.linalg.norm(w)
        cents[i] /= np.linalg.norm(cents[i])
    correct = total = 0
    per_domain = {}
    for dom in DOMAINS:
        docs = corpus[dom, "heldout"]
        ok = 0
        for d in docs:
            idx, val = _bow(d["text"], cache, dim)
            ok += int(labels[int(np.argmax(cents[:, idx] @ (val * idf[idx])))] == dom)
        per_domain[dom] = round(ok / len(docs), 3)
        correct += ok
        total += len(docs)
    assert correct / total >= 0.9, per_domain
    assert min(per_domain.values()) >= 0.8, per_domain


def test_near_duplicate_detector() -> None:
    words = [f"w{(i * 7919) % 1009}" for i in range(300)]
    base = " ".join(words)
    edited = " ".join(words[:150] + ["changed"] + words[151:])
    other = " ".join(f"z{(i * 104729) % 997}" for i in range(300))
    h = ShingleHasher()
    a, b, c = h(base), h(edited), h(other)
    assert jaccard(a, b) >= NEAR_DUP_JACCARD > jaccard(a, c)
    pairs = find_near_duplicates([b, c], [a])
    assert [(q, r) for q, r, _ in pairs] == [(0, 0)]
    assert find_near_duplicates([c], [a, b]) == []
    assert math.isclose(jaccard(a, a), 1.0)
