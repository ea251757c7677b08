"""Token shards: users' text → flat uint16/uint32 memmaps + a JSON index, streamed.

Inputs may be files or directories of `.jsonl` (optionally `.gz`/`.xz`), `.txt` (one document per
file), `.parquet`, or a saved HF `datasets` directory. Memory stays bounded whatever the input:
`.txt` files are read in blocks, a JSONL line may be at most MAX_LINE_BYTES, any document longer
than MAX_CHUNK_CHARS is tokenized in pieces cut before a space (which byte-level BPE tokenizes
exactly as the whole text), and a batch holds at most about BATCH_CHARS characters. Only regular
files are opened (a FIFO or device is refused, never waited on); nothing is left at the
destination unless the run succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import lzma
import operator
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_dir, guard_output, read_json, sha256_file, write_json

INDEX = "index.json"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".json.gz")
DEFAULT_SHARD_TOKENS = 1 << 27
MIN_SHARD_TOKENS = 1 << 16  # smaller shards only multiply files (0 or -1 once made millions)
MAX_SHARD_TOKENS = 1 << 31
MAX_LINE_BYTES = 64 << 20  # a longer JSONL line is refused, not read
MAX_CHUNK_CHARS = 1 << 18  # the tokenizer never sees more text than this at once
BATCH_CHARS = 1 << 20  # a batch is flushed once it holds this much text (or batch_docs pieces)
READ_BLOCK_CHARS = 1 << 20  # .txt files are read this much at a time


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


def _check_regular(path: Path) -> None:
    """An input file must be a regular file (following links): a FIFO would block the reader
    forever and a device never ends."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FlexmoeError(f"input not found: {path}") from None
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FlexmoeError(f"{path}: not a regular file")


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
            files = sorted(f for f in p.rglob("*") if _kind(f) and not f.is_dir())
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
    for kind, p in found:
        if kind != "hf":
            _check_regular(p)
        if not os.access(p, os.R_OK):
            raise FlexmoeError(f"input not readable: {p}")
    return found


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for binary reading only if it is a regular file. O_NONBLOCK makes opening a
    FIFO return at once, and the check is made on the opened descriptor, so a file swapped for a
    FIFO or device after an earlier check is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket cannot be opened
            raise FlexmoeError(f"{path}: not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FlexmoeError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """A regular file as decompressed bytes (`.gz`/`.xz` by name)."""
    with open_regular(path) as raw:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        elif path.name.endswith(".xz"):
            with lzma.LZMAFile(raw, mode="rb") as f:
                yield f
        else:
            yield raw


def _sha256_regular(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of a .jsonl(.gz/.xz) file, skipping blank lines; invalid JSON,
    bad UTF-8 or a line longer than MAX_LINE_BYTES raises FlexmoeError naming the file and line
    (a long line is never read whole). Shared by every JSONL reader."""
    limit = MAX_LINE_BYTES
    with _open_decompressed(Path(path)) as f:
        lineno = 0
        while raw := f.readline(limit + 1):
            lineno += 1
            if len(raw) > limit:
                raise FlexmoeError(
                    f"{path}:{lineno}: line longer than {_size(limit)} "
                    f"(a JSONL record may be at most {limit:,} bytes)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FlexmoeError(f"{path}:{lineno}: not UTF-8 text") from None
            del raw
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlexmoeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            del line
            yield lineno, rec


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n:,} bytes"


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while reading `path` into one FlexmoeError naming it."""
    try:
        yield
    except FlexmoeError:
        raise
    except UnicodeDecodeError:
        raise FlexmoeError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow and friends raise their own types for corrupt files
        raise FlexmoeError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _iter_docs(kind: str, path: Path, field: str) -> Iterator[str]:
    if kind == "jsonl":
        for lineno, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or field not in rec:
                raise FlexmoeError(f"{path}:{lineno}: missing field '{field}'")
            if not isinstance(rec[field], str):
                raise FlexmoeError(f"{path}:{lineno}: field '{field}' is not a string")
            yield rec[field]
    elif kind == "txt":
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            yield f.read()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with open_regular(path) as raw:
            pf = pq.ParquetFile(raw)
            if field not in pf.schema_arrow.names:
                raise FlexmoeError(f"{path}: missing column '{field}'")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
    elif kind == "hf":
        yield from _iter_hf_dataset(path, field)


def iter_texts(kind: str, path: Path, field: str) -> Iterator[str]:
    """Yield whole documents from one input; raise FlexmoeError naming the file on any problem.
    (A `.txt` document is read whole: tokenizing uses `iter_pieces`, which never does.)"""
    with _reading(path):
        yield from _iter_docs(kind, path, field)


def iter_pieces(kind: str, path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of one input's documents, each at most about
    MAX_CHUNK_CHARS long, cut as `split_text` does; a `.txt` file is read block by block."""
    with _reading(path):
        if kind == "txt":
            yield from _iter_txt_pieces(path)
            return
        for doc in _iter_docs(kind, path, field):
            prev = None
            for piece in _iter_split(doc, MAX_CHUNK_CHARS):
                if prev is not None:
                    yield prev, False
                prev = piece
            if prev is not None:
                yield prev, True


def _iter_txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A .txt file (one document) read READ_BLOCK_CHARS at a time (newlines translated as a
    text-mode read does), cut exactly where `split_text` would cut the whole text."""
    with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        buf = ""
        while block := f.read(READ_BLOCK_CHARS):
            pieces, buf = split_text(buf + block, final=False)
            yield from ((p, False) for p in pieces)
        pieces, _ = split_text(buf)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


# the last cut candidate in a window, found by searching the reversed window: a space (else any
# whitespace) whose preceding character is not whitespace
_CUT_BEFORE_SPACE = re.compile(r" (?=\S)")
_CUT_BEFORE_WHITESPACE = re.compile(r"\s(?=\S)")


def _cut(text: str, start: int, limit: int) -> int:
    """Where to end the piece of `text` that begins at `start` (len(text) - start > limit).

    Preferably just before a space that follows a non-space character, as late as possible in
    the window's second half: byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen) never join a
    non-space character to a following space, so tokenizing the pieces gives exactly the tokens
    of the whole text. Failing that, before any whitespace after a non-space (still a boundary
    for GPT-2's pattern); failing that (no whitespace in the window), at `limit`, which may
    change the tokens next to the cut (at most the two pre-tokens it splits).
    """
    lo, hi = start + limit // 2, start + limit
    window = text[lo : hi + 1][::-1]
    for pat in (_CUT_BEFORE_SPACE, _CUT_BEFORE_WHITESPACE):
        m = pat.search(window)
        if m is not None:
            return hi - m.start()
    return hi


def split_text(text: str, final: bool = True, limit: int | None = None) -> tuple[list[str], str]:
    """(pieces, rest): `text` cut into pieces of at most `limit` characters (MAX_CHUNK_CHARS)
    by `_cut`; a text of at most `limit` characters is one piece, unchanged. With final=False,
    the tail that is not yet longer than `limit` is returned as `rest` to be continued."""
    limit = MAX_CHUNK_CHARS if limit is None else limit
    pieces = list(_iter_split(text, limit, final))
    if final:
        return pieces, ""
    start = sum(map(len, pieces))
    return pieces, text[start:] if start else text


def _iter_split(text: str, limit: int, final: bool = True) -> Iterator[str]:
    start = 0
    while len(text) - start > limit:
        end = _cut(text, start, limit)
        yield text[start:end]
        start = end
    if final and start < len(text):
        yield text[start:] if start else text


def _iter_hf_dataset(path: Path, field: str) -> Iterator[str]:
    """Stream a `Dataset.save_to_disk` directory straight from its Arrow files."""
    import pyarrow as pa

    state = read_json(path / "state.json", "HF dataset state")
    if not isinstance(state, dict) or not isinstance(state.get("_data_files", []), list):
        raise FlexmoeError(f"{path}: state.json does not list the dataset's files")
    for entry in state.get("_data_files", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise FlexmoeError(f"{path}: state.json does not list the dataset's files")
        with open_regular(path / entry["filename"]) as source:
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


def check_shard_tokens(shard_tokens: int) -> int:
    """Tokens per shard file, within [MIN_SHARD_TOKENS, MAX_SHARD_TOKENS] (checked first: a
    tiny or negative size once wrote millions of empty files)."""
    try:
        n = operator.index(shard_tokens)
    except TypeError:
        n = None
    if n is None or isinstance(shard_tokens, bool) or not MIN_SHARD_TOKENS <= n <= MAX_SHARD_TOKENS:
        raise FlexmoeError(
            f"shard size (--shard-tokens) {shard_tokens!r} is out of range: it must be between "
            f"{MIN_SHARD_TOKENS:,} (2^16) and {MAX_SHARD_TOKENS:,} (2^31)"
        )
    return n


def tokenize_to_shards(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_docs: int = 512,
    overwrite: bool = False,
) -> TokenizeStats:
    """Tokenize inputs into `out_dir`: shard_XXXXX.bin memmaps + index.json. Atomic.

    A batch holds at most `batch_docs` pieces and about BATCH_CHARS characters; a document
    longer than MAX_CHUNK_CHARS is tokenized piece by piece (see `split_text`) and gets one EOS.
    """
    shard_tokens = check_shard_tokens(shard_tokens)
    if type(batch_docs) is not int or batch_docs < 1:
        raise FlexmoeError(f"batch_docs must be a positive integer, got {batch_docs!r}")
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

        def flush(batch: list[tuple[str, bool]]) -> tuple[int, int]:
            ids = tok([text for text, _ in batch], add_special_tokens=False)["input_ids"]
            docs = tokens = 0
            for seq, (_, ends_doc) in zip(ids, batch, strict=True):
                if ends_doc:
                    seq.append(eos)
                    docs += 1
                writer.write(np.asarray(seq, dtype=dtype))
                tokens += len(seq)
            return docs, tokens

        for kind, path in found:
            s_docs = s_tokens = s_bytes = 0
            batch: list[tuple[str, bool]] = []
            batch_chars = 0
            for piece, ends_doc in iter_pieces(kind, path, field):
                batch.append((piece, ends_doc))
                batch_chars += len(piece)
                s_bytes += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
                if len(batch) >= batch_docs or batch_chars >= BATCH_CHARS:
                    d, t = flush(batch)
                    s_docs, s_tokens, batch, batch_chars = s_docs + d, s_tokens + t, [], 0
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
        with _reading(path):
            return _sha256_regular(path)
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


FINGERPRINT = "tokens-v1:"  # shards_sha256's format; an earlier one hashed the index file


def shards_sha256(path: str | Path) -> str:
    """The fingerprint of what training reads from a token-shard directory ("tokens-v1:" + a
    sha256): the token stream (every shard's declared tokens, in order) and the index fields that
    decide how it is read (dtype, EOS, vocabulary, tokenizer). Not where the raw text lived when
    it was tokenized nor how the stream is cut into shard files: the same tokens fingerprint
    alike wherever they were made."""
    path = Path(path)
    index = TokenStream(path).index  # the index checked against the shard files' sizes
    head = {k: index[k] for k in ("dtype", "eos_token_id", "vocab_size", "tokenizer_sha256")}
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    itemsize = np.dtype(index["dtype"]).itemsize
    for sh in index["shards"]:
        f, left = path / sh["file"], sh["tokens"] * itemsize
        try:
            with open_regular(f) as fh:
                while left and (block := fh.read(min(left, 1 << 20))):
                    h.update(block)
                    left -= len(block)
        except OSError as e:
            raise FlexmoeError(f"{f}: cannot read ({e.strerror or e})") from None
        if left:
            raise FlexmoeError(f"{f}: shorter than its {sh['tokens']} tokens")
    return FINGERPRINT + h.hexdigest()


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
