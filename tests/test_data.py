"""Tokenizer, `flexmoe data tokenize` on every input type, bad input, and bits per byte."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import run_cli, sample_texts, write_jsonl
from flexmoe.data import shards as shards_mod
from flexmoe.data.shards import (
    MAX_SHARD_TOKENS,
    MIN_SHARD_TOKENS,
    TokenStream,
    open_regular,
    shards_sha256,
    split_text,
    tokenize_to_shards,
)
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import bits_per_byte, evaluate_bpb

TRICKY = "Grüße, 世界! naïve café — emoji 🧪🚀\ttabs\n\nnew lines \u200b zero-width"


def test_tokenizer_round_trip_and_autotokenizer(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 512
    for text in [TRICKY, *sample_texts("code", "heldout", 3), *sample_texts("news", "heldout", 3)]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_token_byte_lengths_are_exact(tok_dir):
    tok = load_tokenizer(tok_dir)
    tb = token_byte_lengths(tok)
    for text in [TRICKY, *sample_texts("social", "heldout", 3)]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert tb[tok.eos_token_id] == 0


def test_tokenizer_trained_on_public_only():
    """The shared tokenizer's training command reads only the public train split."""
    import inspect

    from flexmoe.cli.data import data_train_tokenizer

    src = inspect.getsource(data_train_tokenizer)
    assert "PUBLIC" in src and '"train"' in src


@pytest.fixture
def no_hang():
    """A test that would block (reading a FIFO) fails after 60 s instead of hanging."""

    def fail(*_):
        raise TimeoutError("blocked: an input was waited on")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _nothing_left(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]


def _read_all(path):
    s = TokenStream(path)
    return s, s.window(0, len(s))


def test_tokenize_jsonl_txt_parquet_hf_agree(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sample_texts("math", "heldout", 5)
    jsonl = write_jsonl(tmp_path / "in" / "a.jsonl", texts, field="body")
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:02d}.txt").write_text(t)
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    from datasets import Dataset

    Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "hfds"))

    outs = {}
    for name, src in [
        ("jsonl", jsonl),
        ("txt", txt_dir),
        ("parquet", tmp_path / "a.parquet"),
        ("hf", tmp_path / "hfds"),
    ]:
        stats = tokenize_to_shards([src], tmp_path / f"out-{name}", tok_dir, field="body")
        assert stats.documents == 5
        outs[name] = _read_all(tmp_path / f"out-{name}")
    ref_stream, ref = outs["jsonl"]
    for name, (s, arr) in outs.items():
        assert np.array_equal(arr, ref), name
        assert s.index["documents"] == 5 and s.index["sources"][0]["sha256"]
    tok = load_tokenizer(tok_dir)
    assert ref_stream.index["dtype"] == "uint16"
    assert (ref == tok.eos_token_id).sum() == 5
    assert ref_stream.index["bytes"] == sum(len(t.encode()) for t in texts)


def test_tokenize_streams_across_shards(tmp_path, tok_dir):
    """The smallest shard size allowed, on ~4.5 shards' worth of tokens, gives several shard
    files; the stream reads across them."""
    texts = sample_texts("news", "train", 60) * 5  # ~0.8 MB of text, ~300k tokens
    src = write_jsonl(tmp_path / "n.jsonl", texts)
    tokenize_to_shards([src], tmp_path / "one", tok_dir)
    tokenize_to_shards(
        [src], tmp_path / "many", tok_dir, shard_tokens=MIN_SHARD_TOKENS, batch_docs=7
    )
    one, many = TokenStream(tmp_path / "one"), TokenStream(tmp_path / "many")
    assert len(one.index["shards"]) == 1 and len(many.index["shards"]) >= 4
    assert [s["tokens"] for s in many.index["shards"][:-1]] == [MIN_SHARD_TOKENS] * (
        len(many.index["shards"]) - 1
    )
    assert np.array_equal(one.window(0, len(one)), many.window(0, len(many)))
    edge = MIN_SHARD_TOKENS - 10
    assert np.array_equal(one.window(edge, 50), many.window(edge, 50))


def test_data_fingerprint_is_the_tokens_not_where_they_were_made(tmp_path, tok_dir):
    """A package's training.data_sha256 (`audit --trained-by` checks it): the same tokens,
    tokenized from a copy of the raw file in another directory or cut into other shard files,
    fingerprint alike; one changed token does not."""
    texts = sample_texts("news", "train", 60) * 5
    src = write_jsonl(tmp_path / "a" / "n.jsonl", texts)
    copy = tmp_path / "b" / "elsewhere.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    tokenize_to_shards([src], tmp_path / "one", tok_dir)
    tokenize_to_shards([copy], tmp_path / "moved", tok_dir)
    tokenize_to_shards([src], tmp_path / "many", tok_dir, shard_tokens=MIN_SHARD_TOKENS)
    assert (tmp_path / "one" / "index.json").read_bytes() != (
        tmp_path / "moved" / "index.json"
    ).read_bytes()  # the index records the source's path
    fp = shards_sha256(tmp_path / "one")
    assert shards_sha256(tmp_path / "moved") == fp == shards_sha256(tmp_path / "many")
    shard = tmp_path / "moved" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    assert shards_sha256(tmp_path / "moved") != fp
    with pytest.raises(FlexmoeError, match="not a token-shard directory"):
        shards_sha256(tmp_path / "a")
    shard.write_bytes(bytes(raw) + b"\0\0")  # bytes past the declared tokens: a bad index
    with pytest.raises(FlexmoeError, match="does not match"):
        shards_sha256(tmp_path / "moved")


def _long_text() -> str:
    """~120 kB of multi-paragraph text of every kind, with odd whitespace."""
    parts = []
    for domain in ("news", "code", "math", "social", "creative"):
        parts += sample_texts(domain, "heldout", 6)
    parts += [TRICKY, "a  b   c\t\td\n\n\n  e", "    indented\n\tcode  "]
    return "\n\n".join(parts[:20]) + "." + LONG_WORD + "\n\n".join(parts[20:])


LONG_WORD = " " + "x" * 1500 + " "  # longer than some windows: cut inside when nothing else


def test_split_text_keeps_tokenization(tok_dir):
    """Pieces cut before a space tokenize exactly as the whole text (byte-level BPE); a text up
    to the limit is one piece; streamed splitting cuts where whole-text splitting does."""
    tok = load_tokenizer(tok_dir)
    text = _long_text()

    def ids(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    whole, met = ids(text), set()
    for limit in (257, 1000, 4096):
        pieces, rest = split_text(text, limit=limit)
        assert rest == "" and "".join(pieces) == text
        assert len(pieces) > len(text) // limit and all(0 < len(p) <= limit for p in pieces)
        # cuts (but those inside the long word) are before whitespace after a
        # non-space, nearly all before a space
        cuts = [(a[-1], b[0]) for a, b in zip(pieces, pieces[1:], strict=False)]
        in_word = [c for c in cuts if c == ("x", "x")]
        cuts = [c for c in cuts if c != ("x", "x")]
        assert len(in_word) <= 1500 // (limit // 2) + 1
        assert all(b.isspace() and not a.isspace() for a, b in cuts)
        assert sum(b == " " for _, b in cuts) >= 0.95 * len(cuts)
        chunked = [i for p in pieces for i in ids(p)]
        if not in_word:  # every cut before whitespace: identical tokens
            assert chunked == whole
        else:  # cuts inside the long word change only that word's tokens
            before, _, after = text.partition(LONG_WORD)
            assert chunked[: len(ids(before))] == ids(before)
            assert chunked[-len(ids(" " + after)) :] == ids(" " + after)
        met.add(bool(in_word))
        # streamed in blocks of any size: the same cuts
        buf, streamed = "", []
        for k in range(0, len(text), 777):
            out, buf = split_text(buf + text[k : k + 777], final=False, limit=limit)
            streamed += out
        assert streamed + split_text(buf, limit=limit)[0] == pieces
    assert met == {True, False}  # both cases were checked
    assert split_text(text[:500], limit=500) == ([text[:500]], "")
    assert split_text("", limit=500) == ([], "")


def test_long_txt_and_jsonl_documents_tokenize_in_pieces(tmp_path, tok_dir, monkeypatch):
    """A document longer than the chunk size, from .txt (read in blocks, CRLF translated as
    before) or a JSONL line, gets the tokens of the whole text and one EOS."""
    monkeypatch.setattr(shards_mod, "MAX_CHUNK_CHARS", 2000)
    monkeypatch.setattr(shards_mod, "READ_BLOCK_CHARS", 999)
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 5000)
    text = _long_text().replace(LONG_WORD, " x ")
    (tmp_path / "doc.txt").write_bytes(text.replace("\n", "\r\n").encode())
    write_jsonl(tmp_path / "doc.jsonl", [text])
    tok = load_tokenizer(tok_dir)
    expect = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    for name in ("doc.txt", "doc.jsonl"):
        stats = tokenize_to_shards([tmp_path / name], tmp_path / f"out-{name}", tok_dir)
        assert stats.documents == 1 and stats.bytes == len(text.encode())
        assert _read_all(tmp_path / f"out-{name}")[1].tolist() == expect, name


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "input not found"),
        ("field", "missing field 'text'"),
        ("empty", "no documents"),
        ("unreadable", "not readable"),
        ("badjson", "invalid JSON"),
        ("binary", "not UTF-8"),
        ("fifo", "x.txt: not a regular file"),
    ],
)
def test_tokenize_bad_input(tmp_path, tok_dir, capsys, no_hang, case, expect):
    src = tmp_path / "in.jsonl"
    if case == "fifo":
        src = tmp_path / "x.txt"
        os.mkfifo(src)
    elif case == "field":
        write_jsonl(src, ["hello"], field="content")
    elif case == "empty":
        src.write_text("")
    elif case == "unreadable":
        write_jsonl(src, ["hello"])
        os.chmod(src, 0)
        if os.access(
            src, os.R_OK
        ):  # root ignores permissions: make it a directory-less dangling link
            os.chmod(src, 0o644)
            src.unlink()
            src.symlink_to(tmp_path / "nowhere.jsonl")
            expect = "input not found"
    elif case == "badjson":
        src.write_text('{"text": "ok"}\n{not json\n')
    elif case == "binary":
        src = tmp_path / "in.txt"
        src.write_bytes(b"\xff\xfe\x00\x81 binary")
    out = tmp_path / "out"
    code, _, err = run_cli(["data", "tokenize", src, "-o", out, "--tokenizer", tok_dir], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temp dir left


def test_tokenize_refuses_what_is_not_a_regular_file(tmp_path, tok_dir, no_hang):
    """A FIFO, device or socket, given or met in a directory, is refused at once; a file
    swapped for a FIFO after the check is refused when opened (never waited on)."""
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.txt").write_text("fine")
    os.mkfifo(tmp_path / "d" / "y.jsonl.gz")
    (tmp_path / "dev.jsonl").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    with contextlib.closing(sock):
        sock.bind(str(tmp_path / "s.parquet"))
        for src, name in [
            (fifo, "x.txt"),
            (tmp_path / "d", "y.jsonl.gz"),
            (tmp_path / "dev.jsonl", "dev.jsonl"),
            (tmp_path / "s.parquet", "s.parquet"),
        ]:
            with pytest.raises(FlexmoeError, match=f"{name}: not a regular file"):
                tokenize_to_shards([src], tmp_path / "out", tok_dir)
            _nothing_left(tmp_path)
        for path in (fifo, tmp_path / "dev.jsonl", tmp_path / "s.parquet"):
            with pytest.raises(FlexmoeError, match="not a regular file"):
                open_regular(path)


@pytest.mark.parametrize("n", [0, -1, MIN_SHARD_TOKENS - 1, MAX_SHARD_TOKENS + 1, 2.0**20])
def test_tokenize_refuses_bad_shard_tokens(tmp_path, tok_dir, n):
    src = write_jsonl(tmp_path / "a.jsonl", ["hello world"])
    with pytest.raises(FlexmoeError, match=r"between 65,536 \(2\^16\) and 2,147,483,648"):
        tokenize_to_shards([src], tmp_path / "out", tok_dir, shard_tokens=n)
    _nothing_left(tmp_path)


def test_jsonl_line_limit(tmp_path, monkeypatch):
    """A line over MAX_LINE_BYTES is refused by number, compressed or not, without reading it
    whole; lines up to the limit are read."""
    monkeypatch.setattr(shards_mod, "MAX_LINE_BYTES", 100)
    src = tmp_path / "a.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write('{"text": "short"}\n\n' + json.dumps({"text": "y" * 80}) + "\n")
        f.write(json.dumps({"text": "z" * 10**6}) + "\n")
    with pytest.raises(FlexmoeError, match=r"a.jsonl.gz:4: line longer than 100 bytes"):
        list(shards_mod.iter_jsonl(src))
    assert [n for n, _ in itertools.islice(shards_mod.iter_jsonl(src), 2)] == [1, 3]


_PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from flexmoe.data.shards import tokenize_to_shards
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.errors import FlexmoeError
    src, out, tok = sys.argv[1:4]
    load_tokenizer(tok)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        s = tokenize_to_shards([src], out, tok)
        result = f"ok {s.documents} {s.bytes}"
    except FlexmoeError as e:
        result = f"refused {e}"
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(growth // 1024, result)
    """
)


def _tokenize_rss(src, out, tok_dir, timeout: float) -> tuple[int, str]:
    """(peak RSS growth in MiB during tokenize_to_shards, its result) in a fresh process."""
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(src), str(out), str(tok_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    growth, result = r.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(growth), result


def _write_single_line(path, n_bytes: int, json_line: bool = False) -> int:
    """A file holding one line of about n_bytes of real text (as .txt, or as one JSON record);
    returns the text's size in bytes."""
    text = " ".join(t.replace("\n", " ") for t in sample_texts("news", "train", 40))
    block = text.encode("ascii", "ignore")[: 1 << 20].replace(b'"', b"'").replace(b"\\", b"/")
    with open(path, "wb") as f:
        f.write(b'{"text": "' if json_line else b"")
        for _ in range(n_bytes // len(block)):
            f.write(block)
        f.write(b'"}\n' if json_line else b"")
    return n_bytes // len(block) * len(block)


@pytest.mark.parametrize("mb", [pytest.param(200, marks=pytest.mark.slow), 6])
def test_single_line_txt_tokenized_in_bounded_memory(tmp_path, tok_dir, mb):
    """A one-line .txt document is read and tokenized in pieces: memory does not grow with it
    (tokenized whole, 6 MB took ~0.9 GB and 200 MB over 8 GiB)."""
    src = tmp_path / "line.txt"
    size = _write_single_line(src, mb * 10**6)
    try:
        growth, result = _tokenize_rss(src, tmp_path / "out", tok_dir, timeout=60 + 5 * mb)
    finally:
        src.unlink()
    assert result == f"ok 1 {size}"
    assert growth < (1024 if mb > 6 else 350), growth


def test_huge_json_line_refused_in_bounded_memory(tmp_path, tok_dir):
    """A 200 MB single JSON line is refused after reading MAX_LINE_BYTES, quickly and without
    the memory it would take to parse; nothing is left at the destination."""
    src = tmp_path / "line.jsonl"
    _write_single_line(src, 200 * 10**6, json_line=True)
    try:
        growth, result = _tokenize_rss(src, tmp_path / "out", tok_dir, timeout=60)
    finally:
        src.unlink()
    assert result.startswith(f"refused {src}:1: line longer than 64 MiB"), result
    assert growth < 1024, growth
    _nothing_left(tmp_path)


def test_bits_per_byte_uniform_model(tmp_path, tok_dir):
    """A uniform model over V tokens costs log2(V) bits per token."""
    src = write_jsonl(tmp_path / "c.jsonl", sample_texts("creative", "heldout", 5))
    tokenize_to_shards([src], tmp_path / "s", tok_dir)
    stream = TokenStream(tmp_path / "s")
    tok = load_tokenizer(tok_dir)
    tb = token_byte_lengths(tok)
    V = len(tok)
    res = evaluate_bpb(lambda ids: torch.zeros(*ids.shape, V), stream, tb, seq_len=32)
    assert res["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert res["bpb"] == pytest.approx(res["tokens"] * math.log2(V) / res["bytes"], rel=1e-6)
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)


def test_data_stats_cli(capsys):
    code, out, _ = run_cli(["data", "stats"], capsys)
    assert code == 0
    for d in ("public", "code", "math", "news", "social", "creative", "academic", "educational"):
        assert d in out
    assert json.dumps  # keep import used
