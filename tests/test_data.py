"""Tokenizer, `flexmoe data tokenize` on every input type, bad input, and bits per byte."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import run_cli, sample_texts, write_jsonl
from flexmoe.data.shards import TokenStream, tokenize_to_shards
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
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
    """Small shard size forces several shard files; the stream reads across them."""
    texts = sample_texts("news", "train", 20)
    src = write_jsonl(tmp_path / "n.jsonl", texts)
    tokenize_to_shards([src], tmp_path / "one", tok_dir)
    tokenize_to_shards([src], tmp_path / "many", tok_dir, shard_tokens=1000, batch_docs=3)
    one, many = TokenStream(tmp_path / "one"), TokenStream(tmp_path / "many")
    assert len(many.index["shards"]) > 3
    assert np.array_equal(one.window(0, len(one)), many.window(0, len(many)))
    assert np.array_equal(one.window(990, 50), many.window(990, 50))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "input not found"),
        ("field", "missing field 'text'"),
        ("empty", "no documents"),
        ("unreadable", "not readable"),
        ("badjson", "invalid JSON"),
        ("binary", "not UTF-8"),
    ],
)
def test_tokenize_bad_input(tmp_path, tok_dir, capsys, case, expect):
    src = tmp_path / "in.jsonl"
    if case == "field":
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
