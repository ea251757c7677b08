"""Token shards: users' text → flat uint16/uint32 memmaps + a JSON index, streamed.

Inputs may be files or directories of `.jsonl` (optionally `.gz`/`.xz`), `.txt` (one document per
file), `.parquet`, or a saved HF `datasets` directory. Nothing is held in memory beyond one batch,
so a corpus larger than RAM works; nothing is left at the destination unless the run succeeds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_dir, guard_output, read_json, sha256_file, write_json

INDEX = "index.json"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".json.gz")
DEFAULT_SHARD_TOKENS = 1 << 27


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (
        path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").exists()
    )


def discover_inputs(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """Resolve inputs to (kind, path) pairs in a stable order; reject what cannot be read."""
    found: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FlexmoeError(f"input not found: {p}")
        if _is_hf_dataset_dir(p):
            found.append(("hf", p))
        elif p.is_dir():
            hf_dirs = sorted(d for d in p.rglob("state.json") if _is_hf_dataset_dir(d.parent))
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            hf_roots = [d.parent for d in hf_dirs]
            files = [f for f in files if not any(r in f.parents for r in hf_roots)]
            found += [("hf", d) for d in hf_roots] + [(_kind(f), f) for f in files]
            if not hf_roots and not files:
                raise FlexmoeError(f"no .jsonl/.txt/.parquet files or HF dataset in directory {p}")
        else:
            kind = _kind(p)
            if kind is None:
                raise FlexmoeError(f"unsupported input type: {p} (use .jsonl, .txt, .parquet)")
            found.append((kind, p))
    for _, p in found:
        if not os.access(p, os.R_OK):
            raise FlexmoeError(f"input not readable: {p}")
    return found


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of a .jsonl(.gz/.xz) file, skipping blank lines; invalid JSON
    raises FlexmoeError naming the file and line. Shared by every JSONL reader."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise FlexmoeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def iter_texts(kind: str, path: Path, field: str) -> Iterator[str]:
    """Yield documents from one input; raise FlexmoeError naming the file on any problem."""
    try:
        if kind == "jsonl":
            for lineno, rec in iter_jsonl(path):
                if not isinstance(rec, dict) or field not in rec:
                    raise FlexmoeError(f"{path}:{lineno}: missing field '{field}'")
                if not isinstance(rec[field], str):
                    raise FlexmoeError(f"{path}:{lineno}: field '{field}' is not a string")
                yield rec[field]
        elif kind == "txt":
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise FlexmoeError(f"{path}: missing column '{field}'")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        elif kind == "hf":
            yield from _iter_hf_dataset(path, field)
    except FlexmoeError:
        raise
    except UnicodeDecodeError:
        raise FlexmoeError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow and friends raise their own types for corrupt files
        raise FlexmoeError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _iter_hf_dataset(path: Path, field: str) -> Iterator[str]:
    """Stream a `Dataset.save_to_disk` directory straight from its Arrow files."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(path / entry["filename"])) as source:
            reader = pa.ipc.open_stream(source)
            if field not in reader.schema.names:
                raise FlexmoeError(f"{path}: missing column '{field}'")
            for batch in reader:
                yield from (t for t in batch.column(field).to_pylist() if t is not None)


@dataclass
class TokenizeStats:
    documents: int
    tokens: int
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def tokenize_to_shards(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_docs: int = 512,
    overwrite: bool = False,
) -> TokenizeStats:
    """Tokenize inputs into `out_dir`: shard_XXXXX.bin memmaps + index.json. Atomic."""

    found = discover_inputs(inputs)
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    out_dir = guard_output(out_dir, "token shards", [*inputs, tokenizer_dir], overwrite)
    if out_dir.exists() and not overwrite:
        raise FlexmoeError(f"output exists: {out_dir} (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        sources, n_docs, n_bytes = [], 0, 0
        for kind, path in found:
            s_docs = s_tokens = s_bytes = 0
            batch: list[str] = []

            def flush(batch: list[str]) -> tuple[int, int]:
                ids = tok(batch, add_special_tokens=False)["input_ids"]
                tokens = 0
                for seq in ids:
                    seq.append(eos)
                    writer.write(np.asarray(seq, dtype=dtype))
                    tokens += len(seq)
                return len(batch), tokens

            for text in iter_texts(kind, path, field):
                if not text:
                    continue
                batch.append(text)
                s_bytes += len(text.encode("utf-8"))
                if len(batch) >= batch_docs:
                    d, t = flush(batch)
                    s_docs, s_tokens, batch = s_docs + d, s_tokens + t, []
            if batch:
                d, t = flush(batch)
                s_docs, s_tokens = s_docs + d, s_tokens + t
            if s_docs == 0:
                raise FlexmoeError(f"{path}: no documents (empty input)")
            sources.append(
                {
                    "path": str(path),
                    "kind": kind,
                    "sha256": _source_hash(kind, path),
                    "documents": s_docs,
                    "tokens": s_tokens,
                    "bytes": s_bytes,
                }
            )
            n_docs += s_docs
            n_bytes += s_bytes
        shards = writer.close()
        index = {
            "format": "flexmoe-token-shards/1",
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "eos_token_id": eos,
            "tokenizer_sha256": sha256_file(Path(tokenizer_dir) / "tokenizer.json"),
            "field": field,
            "documents": n_docs,
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": n_bytes,
            "shards": shards,
            "sources": sources,
        }
        write_json(tmp / INDEX, index)
    return TokenizeStats(n_docs, index["tokens"], n_bytes, time.perf_counter() - t0)


def _source_hash(kind: str, path: Path) -> str:
    if kind != "hf":
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


class _ShardWriter:
    def __init__(self, root: Path, dtype, shard_tokens: int):
        self.root, self.dtype, self.cap = root, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self._f = open(self.root / name, "wb")
        self._n = 0
        self.shards.append({"file": name, "tokens": 0})

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if self._f is None or self._n >= self.cap:
                self._close_current()
                self._open()
            take = min(arr.size, self.cap - self._n)
            self._f.write(arr[:take].tobytes())
            self._n += take
            self.shards[-1]["tokens"] = self._n
            arr = arr[take:]

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> list[dict]:
        self._close_current()
        for s in self.shards:
            s["sha256"] = sha256_file(self.root / s["file"])
        return self.shards


def _check_index(path: Path, index: object) -> dict:
    """A token-shard index must describe plain shard files inside `path` whose sizes match."""
    import re

    def bad(what: str) -> FlexmoeError:
        return FlexmoeError(f"{path / INDEX}: {what}")

    if not isinstance(index, dict):
        raise bad("not a token-shard index")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise bad("'dtype' must be uint16 or uint32")
    for key in ("vocab_size", "eos_token_id"):
        if type(index.get(key)) is not int or index[key] < 0:
            raise bad(f"'{key}' must be a non-negative integer")
    if not isinstance(index.get("tokenizer_sha256"), str):
        raise bad("'tokenizer_sha256' is missing")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("'shards' must be a non-empty list")
    itemsize = np.dtype(index["dtype"]).itemsize
    for sh in shards:
        if not isinstance(sh, dict) or not isinstance(sh.get("file"), str):
            raise bad("every shard needs a 'file'")
        if not re.fullmatch(r"shard_\d{5}\.bin", sh["file"]):
            raise bad(f"shard file name {sh['file'][:40]!r} is not shard_NNNNN.bin")
        if type(sh.get("tokens")) is not int or sh["tokens"] < 0:
            raise bad(f"{sh['file']}: 'tokens' must be a non-negative integer")
        f = path / sh["file"]
        size = f.stat().st_size if f.is_file() else None
        if size != sh["tokens"] * itemsize:
            raise bad(f"{sh['file']} is missing or its size does not match {sh['tokens']} tokens")
    return index


class TokenStream:
    """Read-only view of a shard directory as one long token array (documents joined by EOS)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        idx_path = self.path / INDEX
        if not idx_path.is_file():
            raise FlexmoeError(f"not a token-shard directory (no {INDEX}): {self.path}")
        self.index = _check_index(self.path, read_json(idx_path, f"token-shard index {idx_path}"))
        dtype = np.dtype(self.index["dtype"])
        self.arrays = [
            np.memmap(self.path / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in self.index["shards"]
            if s["tokens"] > 0
        ]
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])

    @classmethod
    def concat(cls, paths: list[str | Path]) -> TokenStream:
        """Several shard directories (same tokenizer) read as one stream, e.g. a data mix."""
        streams = [cls(p) for p in paths]
        shas = {s.index["tokenizer_sha256"] for s in streams}
        if len(shas) != 1:
            raise FlexmoeError("cannot mix token shards made with different tokenizers")
        out = streams[0]
        out.arrays = [a for s in streams for a in s.arrays]
        out.offsets = np.cumsum([0] + [a.size for a in out.arrays])
        out.index = {**out.index, "shards": [sh for s in streams for sh in s.index["shards"]]}
        return out

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) across shard boundaries, as int64."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[k])
            take = min(length - filled, self.arrays[k].size - local)
            out[filled : filled + take] = self.arrays[k][local : local + take]
            filled += take
            pos += take
        return out
