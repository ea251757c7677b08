"""Reading FlexMix-mini: one xz-compressed JSONL file per (domain, split)."""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from pathlib import Path

PUBLIC = "public"
CLOSED_DOMAINS = ("code", "math", "news", "social", "creative", "academic", "educational")
DOMAINS = (PUBLIC, *CLOSED_DOMAINS)
SPLITS = ("train", "heldout")
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "data" / "flexmix-mini"


def split_path(root: str | Path, domain: str, split: str) -> Path:
    return Path(root) / domain / f"{split}.jsonl.xz"


def iter_docs(root: str | Path, domain: str, split: str) -> Iterator[dict]:
    """Yield {id, source, domain, text} records in file order."""
    path = split_path(root, domain, split)
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
