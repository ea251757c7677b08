"""Corpus statistics for `flexmoe data stats` and the demo."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.data.corpus import DOMAINS, SPLITS, iter_docs, split_path
from flexmoe.data.shards import INDEX
from flexmoe.errors import FlexmoeError


def corpus_stats(corpus: str | Path, tokens_root: str | Path | None = None) -> list[dict]:
    rows = []
    for domain in DOMAINS:
        for split in SPLITS:
            path = split_path(corpus, domain, split)
            if not path.is_file():
                raise FlexmoeError(f"missing corpus file {path}")
            docs = nbytes = 0
            for d in iter_docs(corpus, domain, split):
                docs += 1
                nbytes += len(d["text"].encode("utf-8"))
            ntok = None
            if tokens_root is not None:
                idx = Path(tokens_root) / domain / split / INDEX
                if idx.is_file():
                    ntok = json.loads(idx.read_text())["tokens"]
            rows.append(
                {
                    "domain": domain,
                    "split": split,
                    "documents": docs,
                    "mb": nbytes / 1e6,
                    "tokens": ntok,
                }
            )
    return rows
