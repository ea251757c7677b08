"""The shared tokenizer: byte-level BPE trained on the PUBLIC split only.

Every owner tokenizes private data with it, so it must not need anyone's private data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from flexmoe.errors import FlexmoeError
from flexmoe.fsutil import atomic_dir, guard_output

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
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise FlexmoeError(f"{path}: cannot load the tokenizer ({type(e).__name__})") from None


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id; special tokens count 0 bytes.

    Byte-level BPE writes each byte as exactly one vocabulary character, so a token's byte length
    is its piece's length, and bits-per-byte can be computed from token ids alone.
    """
    vocab = tokenizer.get_vocab()
    out = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    for piece, idx in vocab.items():
        if idx not in special:
            out[idx] = len(piece)
    return out


def batched_encode(tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Encode texts in batches (the Rust backend parallelises a batch) without special tokens."""
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            yield from tokenizer(buf, add_special_tokens=False)["input_ids"]
            buf = []
    if buf:
        yield from tokenizer(buf, add_special_tokens=False)["input_ids"]
