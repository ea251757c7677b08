"""Written by `flexmoe eval build-tasks`: loads this directory's JSONL offline."""

import gzip
import json
from pathlib import Path


def load(file, **_):
    import datasets

    with gzip.open(Path(__file__).parent / file, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}


def gold_bpb(doc, results):
    ll, _ = results[0]
    return {"bits_per_byte": (ll, len(doc["continuation"].encode("utf-8")))}
