"""Shared fixtures: a small tokenizer, token shards and a tiny trained anchor, built once per
session from the committed FlexMix-mini corpus (real data, tiny sizes)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLEXMOE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flexmoe.data.corpus import DEFAULT_ROOT, iter_docs  # noqa: E402

TINY_VOCAB = 512


def sample_texts(domain: str, split: str, n: int, max_chars: int = 4000) -> list[str]:
    return [
        d["text"][:max_chars] for d in itertools.islice(iter_docs(DEFAULT_ROOT, domain, split), n)
    ]


class ArrayStream:
    """A token stream stand-in (len, window) over an array, for evaluate_bpb."""

    def __init__(self, ids):
        import numpy as np

        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self):
        return len(self.ids)

    def window(self, start, n):
        return self.ids[start : start + n]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flexmoe")


@pytest.fixture(scope="session")
def tok_dir(work) -> Path:
    from flexmoe.data.tokenizer import train_tokenizer

    return train_tokenizer(sample_texts("public", "train", 300), work / "tokenizer", TINY_VOCAB)


@pytest.fixture(scope="session")
def shards(work, tok_dir) -> dict[str, Path]:
    """Token shards: public/code × train/heldout, from small real samples."""
    from flexmoe.data.shards import tokenize_to_shards

    out = {}
    for domain, split, n in [
        ("public", "train", 120),
        ("public", "heldout", 20),
        ("code", "train", 60),
        ("code", "heldout", 10),
    ]:
        src = write_jsonl(work / "raw" / f"{domain}-{split}.jsonl", sample_texts(domain, split, n))
        dest = work / "tokens" / domain / split
        tokenize_to_shards([src], dest, tok_dir)
        out[f"{domain}/{split}"] = dest
    return out


@pytest.fixture(scope="session")
def anchor_dir(work, tok_dir, shards) -> Path:
    from flexmoe.lifecycle.anchor import train_anchor

    out = work / "anchor"
    train_anchor(
        shards["public/train"],
        out,
        tok_dir,
        preset="tiny",
        steps=60,
        router_docs=8,
        evals={"public": shards["public/heldout"]},
    )
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `flexmoe` entry point in-process; return (exit code, stdout, stderr)."""
    from flexmoe.cli import main

    old = sys.argv
    sys.argv = ["flexmoe", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def random_merged(
    root: Path,
    anchor_dir: Path,
    names: list[str],
    seed: int,
    out: str = "merged",
    embeddings: dict | None = None,
    **merge_kw,
) -> Path:
    """root/pkg-<name> random packages (seeds seed, seed+1, …; `embeddings`: {name: (384,)}
    domain embeddings) merged into root/out with token routing alone (preselect 0): the serving
    tests' model."""
    from flexmoe.lifecycle.merge import merge

    emb = embeddings or {}
    pkgs = [
        random_package(root / f"pkg-{n}", anchor_dir, n, seed=seed + i, embedding=emb.get(n))
        for i, n in enumerate(names)
    ]
    merge(anchor_dir, pkgs, root / out, log=None, preselect=0, **merge_kw)
    return root / out


def random_package(
    out: Path,
    anchor_dir: Path,
    name: str,
    seed: int,
    embedding=None,
    centroid=None,
    prototypes=None,
    **manifest,
) -> Path:
    """A well-formed expert package with seeded random weights (for merge/routing mechanics);
    `embedding` (384,) is stored as its domain embedding, `centroid` (H,) as its hidden
    centroid, `prototypes` (8, 384) as its MiniLM prototypes (rows normalised)."""
    import torch

    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.package import tensor_sha256, write_package

    model, record, extras = load_anchor(anchor_dir)
    cfg = model.config
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    tensors = {} if embedding is None else {"domain_embedding": embedding / embedding.norm()}
    if centroid is not None:
        tensors["hidden_centroid"] = centroid.float()
    if prototypes is not None:
        tensors["domain_prototypes"] = torch.nn.functional.normalize(prototypes.float(), dim=-1)
    for layer in range(n):
        p = f"layers.{layer}"
        tensors |= {
            f"{p}.gate_proj": torch.randn(i, h, generator=g) * 0.2,
            f"{p}.up_proj": torch.randn(i, h, generator=g) * 0.2,
            f"{p}.down_proj": torch.randn(h, i, generator=g) * 0.2,
            f"{p}.router": torch.randn(h, generator=g),
            f"{p}.bias": -torch.rand((), generator=g),
        }
    m = {
        "name": name,
        "domain": name,
        "owner": f"{name} owner",
        "licence": "CC-BY-4.0",
        "consent": {"allowed_uses": ["research", "commercial"], "expires": None},
        "anchor_fingerprint": record["fingerprint"],
        "public_router_sha256": tensor_sha256(extras["public.domain"]),
        "architecture": {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": n},
        "router_init": "domain",
        "training": {"tokens": 0, "steps": 0, "seed": seed, "hyperparameters": {}},
    } | manifest
    write_package(out, tensors, m)
    return out


def pytest_collection_modifyitems(items):
    """Security cases (the server never fails open) run first."""
    items.sort(key=lambda item: item.get_closest_marker("security") is None)
