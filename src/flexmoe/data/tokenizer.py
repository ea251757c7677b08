"""The shared tokenizer: byte-level BPE trained on the PUBLIC split only.

Every owner tokenizes private data with it, so it must not need anyone's private data.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_dir, guard_output

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
DEFAULT_VOCAB = 8192


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Train byte-level BPE on `texts` and save it so AutoTokenizer.from_pretrained loads it."""
    guard_output(out_dir, "tokenizer", inputs, overwrite)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise FlexmoeError(f"vocab size {vocab_size} is too small (must be >= 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        fast.save_pretrained(tmp)
    return Path(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FlexmoeError(f"no tokenizer at {path} (tokenizer.json missing)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise FlexmoeError(f"{path}: cannot load the tokenizer ({type(e).__name__})") from None


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the one character each byte is written as (char → byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kind(tokenizer) -> str:
    """'bytelevel' (GPT-2/OLMo/SmolLM/Qwen) or 'metaspace' (SentencePiece-style ▁ and <0xNN>)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "bytelevel"
    spec = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {spec.get("type")} | {d.get("type") for d in spec.get("decoders", []) or []}
    return (
        "bytelevel"
        if "ByteLevel" in kinds
        else "metaspace"
        if kinds & {"Metaspace", "ByteFallback", "Replace"}
        else "bytelevel"
    )


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens count 0 bytes.

    Byte-level BPE writes every byte as exactly one alphabet character, so a piece's byte count is
    its number of characters, including pieces that hold only part of a multi-byte character
    (decoding such a token alone would give U+FFFD, 3 bytes: never use decode() to count).
    Added tokens are stored as their literal text: their UTF-8 length. SentencePiece-style vocabs
    write a space as ▁ (1 byte, not ▁'s 3) and raw bytes as <0xNN> (1 byte).
    """
    import re

    vocab = tokenizer.get_vocab()
    out = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    added = (
        set(tokenizer.get_added_vocab().values())
        if hasattr(tokenizer, "get_added_vocab")
        else set()
    )
    kind = _decoder_kind(tokenizer)
    alphabet = _bytes_to_unicode()
    for piece, idx in vocab.items():
        if idx in special:
            continue
        if kind == "metaspace" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[idx] = 1
        elif idx in added:
            out[idx] = len(piece.encode("utf-8"))
        elif kind == "bytelevel":
            out[idx] = sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in piece)
        else:
            out[idx] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out
