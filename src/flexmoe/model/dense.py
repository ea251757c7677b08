"""The dense OLMo-2 anchor trained from scratch: presets, config, seeded init, fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

ROPE_THETA = 500_000.0  # OLMo-2's value; HF's Olmo2Config would default to 10_000.


@dataclass(frozen=True)
class Preset:
    """Model shape plus the training defaults that go with it."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    num_key_value_heads: int | None = None


PRESETS: dict[str, Preset] = {
    # seconds on a CPU: for tests
    "tiny": Preset(64, 2, 4, 192, seq_len=64, batch_size=8, steps=60, lr=1e-2, warmup=5),
    # ≤ 6 minutes on 2 CPU cores with bf16 autocast (scripts/bench_train.py: ~3.2k tokens/s)
    "demo": Preset(256, 4, 4, 768, seq_len=256, batch_size=16, steps=240, lr=3e-3, warmup=20),
    "small": Preset(512, 6, 8, 1536, seq_len=512, batch_size=16, steps=4000, lr=1e-3, warmup=200),
    # OLMo-2 1B / 7B shapes, for GPUs
    "1b": Preset(2048, 16, 16, 8192, seq_len=4096, batch_size=8, steps=10000, lr=4e-4, warmup=2000),
    "7b": Preset(
        4096, 32, 32, 11008, seq_len=4096, batch_size=4, steps=10000, lr=3e-4, warmup=2000
    ),
}


def olmo2_config(preset: str | Preset, vocab_size: int, eos_token_id: int, pad_token_id: int):
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads or p.num_attention_heads,
        max_position_embeddings=max(p.seq_len, 4096),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def new_anchor(config: Olmo2Config, seed: int) -> Olmo2ForCausalLM:
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(config).float()


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
